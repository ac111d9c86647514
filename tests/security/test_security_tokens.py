"""JWT bearer tokens (core/security/tokens.py) and their login through PolicyGate: HS256 with a secret, RS256/ES256
with a JWKS file, exp/nbf/aud/iss, `alg: none` and algorithm confusion refused, the username claim, throttling."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from tidegate.core.errors import NotAuthenticated
from tidegate.core.metrics import SecurityMetrics
from tidegate.core.security.gate import Credentials
from tidegate.core.security.keyfiles import InsecureKeyFile
from tidegate.core.security.policy_gate import LoginThrottle, PolicyGate, open_policy_gate
from tidegate.core.security.tokens import (
    TokenConfigError,
    TokenError,
    TokenVerifier,
    looks_like_jwt,
    open_token_verifier,
)
from tidegate.core.security.users import SecurityDirectory
from tidegate.core.storage.memory import MemoryMetadataStore

SECRET = b"0123456789abcdef0123456789abcdef-test-only"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def jwks_file(tmp_path: Path, rsa_key, ec_key) -> Path:
    rsa_jwk = RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True) | {"kid": "rsa1", "use": "sig"}
    ec_jwk = ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True) | {"kid": "ec1"}
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [rsa_jwk, ec_jwk, {"kty": "oct", "k": "c2VjcmV0", "kid": "sym"}]}))
    return path


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": int(time.time()) + 3600, **extra}


def hs256(payload: dict[str, Any], key: bytes = SECRET, **headers: Any) -> bytes:
    return jwt.encode(payload, key, algorithm="HS256", headers=headers or None).encode()


def refused(verifier: TokenVerifier, token: bytes | str, username: str = "") -> TokenError:
    with pytest.raises(TokenError) as caught:
        verifier.verify(token, username)
    return caught.value


def unsigned(payload: dict[str, Any]) -> bytes:
    """An `alg: none` token, built by hand (PyJWT will not sign one with a key)."""
    def part(obj: Any) -> str:
        return jwt.utils.base64url_encode(json.dumps(obj).encode()).decode()
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}.".encode()


# ---------------------------------------------------------------------------------------------- verifier
def test_hs256_token_with_the_secret_names_its_subject():
    verifier = TokenVerifier(secret=SECRET)
    assert verifier.verify(hs256(claims())).username == "alice"
    assert verifier.verify(hs256(claims()), "alice").claims["sub"] == "alice"


def test_rs256_and_es256_tokens_verify_with_the_jwks_keys(jwks_file, rsa_key, ec_key):
    verifier = TokenVerifier(jwks_file=jwks_file)
    rs = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa1"})
    es = jwt.encode(claims(sub="bob"), ec_key, algorithm="ES256", headers={"kid": "ec1"})
    assert verifier.verify(rs).username == "alice"
    assert verifier.verify(es).username == "bob"
    # one key per algorithm in the file: a token without kid still finds it
    assert verifier.verify(jwt.encode(claims(), rsa_key, algorithm="RS256")).username == "alice"


def test_a_token_signed_by_another_key_is_refused(jwks_file):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    verifier = TokenVerifier(jwks_file=jwks_file, secret=SECRET)
    assert refused(verifier, jwt.encode(claims(), other, algorithm="RS256", headers={"kid": "rsa1"})).cause == \
        "signature"
    assert refused(verifier, hs256(claims(), key=b"x" * 40)).cause == "signature"
    assert refused(verifier, jwt.encode(claims(), other, algorithm="RS256", headers={"kid": "nope"})).cause == "key"


def test_alg_none_is_refused_whatever_is_configured(jwks_file):
    for verifier in (TokenVerifier(secret=SECRET), TokenVerifier(jwks_file=jwks_file),
                     TokenVerifier(secret=SECRET, jwks_file=jwks_file)):
        assert refused(verifier, unsigned(claims())).cause == "algorithm"


def test_algorithm_confusion_hs256_signed_with_the_rsa_public_key_is_refused(jwks_file, rsa_key):
    """The classic attack: take the server's RSA public key (public!) as an HMAC secret and sign HS256."""
    public_pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    forged_header = jwt.utils.base64url_encode(json.dumps({"alg": "HS256", "kid": "rsa1"}).encode())
    forged_body = jwt.utils.base64url_encode(json.dumps(claims()).encode())
    signing_input = forged_header + b"." + forged_body
    import hashlib
    import hmac
    signature = jwt.utils.base64url_encode(hmac.new(public_pem, signing_input, hashlib.sha256).digest())
    forged = signing_input + b"." + signature
    assert refused(TokenVerifier(jwks_file=jwks_file), forged).cause == "algorithm"  # no secret: no HS256 at all
    assert refused(TokenVerifier(jwks_file=jwks_file, secret=SECRET), forged).cause == "signature"
    # and an RS256 header cannot smuggle in the secret either: the key decides the algorithm
    hs_as_rs = jwt.utils.base64url_encode(json.dumps({"alg": "RS256", "kid": "rsa1"}).encode()) + b"." + forged_body
    mac = jwt.utils.base64url_encode(hmac.new(SECRET, hs_as_rs, hashlib.sha256).digest())
    assert refused(TokenVerifier(jwks_file=jwks_file, secret=SECRET), hs_as_rs + b"." + mac).cause == "signature"


def test_symmetric_keys_in_the_jwks_file_are_ignored(jwks_file):
    token = jwt.encode(claims(), b"s" * 32, algorithm="HS256", headers={"kid": "sym"})
    assert refused(TokenVerifier(jwks_file=jwks_file), token).cause == "algorithm"


@pytest.mark.parametrize("payload, cause", [
    ({"sub": "alice", "exp": int(time.time()) - 3600}, "expired"),
    ({"sub": "alice", "exp": int(time.time()) + 3600, "nbf": int(time.time()) + 3600}, "not_yet_valid"),
    ({"sub": "alice"}, "claims"),  # no exp: tokens that never expire are not accepted
    ({"exp": int(time.time()) + 3600}, "claims"),  # no subject
    ({"sub": 42, "exp": int(time.time()) + 3600}, "claims"),
])
def test_time_and_subject_claims_are_checked(payload, cause):
    assert refused(TokenVerifier(secret=SECRET), hs256(payload)).cause == cause


def test_a_small_leeway_forgives_clock_skew():
    just_expired = hs256({"sub": "alice", "exp": int(time.time()) - 5})
    assert TokenVerifier(secret=SECRET, leeway_s=30).verify(just_expired).username == "alice"
    assert refused(TokenVerifier(secret=SECRET, leeway_s=0), just_expired).cause == "expired"


def test_audience_and_issuer_are_checked_when_configured():
    verifier = TokenVerifier(secret=SECRET, audience="tidegate", issuer="https://idp.example")
    good = hs256(claims(aud="tidegate", iss="https://idp.example"))
    assert verifier.verify(good).username == "alice"
    assert verifier.verify(hs256(claims(aud=["other", "tidegate"], iss="https://idp.example"))).username == "alice"
    assert refused(verifier, hs256(claims(aud="other", iss="https://idp.example"))).cause == "audience"
    assert refused(verifier, hs256(claims(aud="tidegate", iss="https://evil.example"))).cause == "issuer"
    assert refused(verifier, hs256(claims(iss="https://idp.example"))).cause == "claims"  # aud missing
    # a token meant for some other service (it names an audience) is refused when no audience is configured
    assert refused(TokenVerifier(secret=SECRET), hs256(claims(aud="billing"))).cause == "audience"


def test_the_username_claim_is_configurable_and_must_match_a_given_name():
    verifier = TokenVerifier(secret=SECRET, username_claim="preferred_username")
    token = hs256(claims(preferred_username="dev-7"))
    assert verifier.verify(token, "dev-7").username == "dev-7"
    assert verifier.verify(token).username == "dev-7"
    assert refused(verifier, token, "alice").cause == "username"


def test_looks_like_jwt_only_for_the_compact_shape():
    assert looks_like_jwt(hs256(claims()))
    assert not looks_like_jwt(b"s3cret")
    assert not looks_like_jwt(b"a.b.c")
    assert not looks_like_jwt(b"")
    assert not looks_like_jwt(b"x" * 20000)


def test_bad_settings_fail_at_start(tmp_path):
    with pytest.raises(TokenConfigError, match="at least 32"):
        TokenVerifier(secret=b"short")
    with pytest.raises(TokenConfigError):
        TokenVerifier()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenConfigError, match="not JSON"):
        TokenVerifier(jwks_file=bad)
    bad.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    with pytest.raises(TokenConfigError, match="no RSA or P-256"):
        TokenVerifier(jwks_file=bad)
    with pytest.raises(TokenConfigError, match="cannot read"):
        open_token_verifier(jwt_jwks_file=str(tmp_path / "missing.json"))
    assert open_token_verifier() is None


def test_the_secret_file_must_not_be_readable_by_group_or_others(tmp_path):
    secret = tmp_path / "jwt.secret"
    secret.write_bytes(SECRET + b"\n")
    os.chmod(secret, 0o640)
    with pytest.raises(InsecureKeyFile, match=r"jwt_secret_file .* accessible by group or others.*chmod 600"):
        open_token_verifier(jwt_secret_file=str(secret))
    os.chmod(secret, 0o600)
    verifier = open_token_verifier(jwt_secret_file=str(secret))
    assert verifier is not None and verifier.secret == SECRET  # the trailing newline is not part of the secret


def test_a_rewritten_jwks_file_is_picked_up(tmp_path, rsa_key):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True) | {"kid": "a"}]}))
    verifier = TokenVerifier(jwks_file=path)
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(), new_key, algorithm="RS256", headers={"kid": "b"})
    assert refused(verifier, token).cause == "key"
    path.write_text(json.dumps({"keys": [RSAAlgorithm.to_jwk(new_key.public_key(), as_dict=True) | {"kid": "b"}]}))
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert verifier.verify(token).username == "alice"


# ---------------------------------------------------------------------------------------------- gate
@pytest.fixture
def directory() -> SecurityDirectory:
    d = SecurityDirectory(MemoryMetadataStore())
    d.bootstrap()
    d.add_user("alice", b"s3cret")
    d.add_user("mallory", b"pw", enabled=False)
    return d


def login(gate: PolicyGate, password: bytes, username: str = "", mechanism: str = "password",
          source: str = "10.0.0.9", listener: str = "mqtt") -> Any:
    out: list[Any] = []
    gate.authenticate(Credentials(mechanism, username=username, password=password, client_id="c1", source=source,
                                  listener=listener)).addBoth(out.append)
    assert out, "the login did not settle"
    return out[0]


def token_gate(directory, clock, **kwargs) -> PolicyGate:
    kwargs.setdefault("throttle", LoginThrottle(clock, base_delay_s=0))
    return PolicyGate(directory, clock, tokens=TokenVerifier(secret=SECRET), **kwargs)


def test_a_valid_token_as_the_password_logs_in_as_its_user(directory):
    gate = token_gate(directory, Clock())
    principal = login(gate, hs256(claims()), username="alice")
    assert principal.name == "alice" and principal.client_id == "c1" and not principal.anonymous
    # without a user name (MQTT 5 allows it; the native SDK sends "anonymous" with a password) the claim decides
    assert login(gate, hs256(claims()), mechanism="anonymous").name == "alice"
    assert login(gate, hs256(claims()), mechanism="token").name == "alice"


@pytest.mark.parametrize("make_token, username, cause", [
    (lambda: hs256({"sub": "alice", "exp": int(time.time()) - 3600}), "alice", "token_expired"),
    (lambda: hs256(claims(), key=b"y" * 40), "alice", "token_signature"),
    (lambda: unsigned(claims()), "alice", "token_algorithm"),
    (lambda: hs256(claims()), "bob", "token_username"),
    (lambda: hs256(claims(sub="nobody")), "", "token_user"),
    (lambda: hs256(claims(sub="mallory")), "", "token_user"),  # disabled user
])
def test_a_refused_token_is_a_failed_login_with_a_cause(directory, make_token, username, cause):
    """Tokens are made when the test runs (not at collection): a valid one must not expire in a long suite."""
    metrics = SecurityMetrics()
    gate = token_gate(directory, Clock(), metrics=metrics)
    result = login(gate, make_token(), username=username)
    assert isinstance(result, Failure) and result.check(NotAuthenticated)
    assert metrics.failed_logins == {("mqtt", cause): 1}


def test_refused_tokens_are_throttled_like_passwords(directory):
    clock = Clock()
    gate = PolicyGate(directory, clock, tokens=TokenVerifier(secret=SECRET),
                      throttle=LoginThrottle(clock, base_delay_s=1.0, max_delay_s=8.0))
    assert isinstance(login(gate, unsigned(claims()), "alice"), Failure)
    out: list[Any] = []
    gate.authenticate(Credentials("password", username="alice", password=hs256(claims()), source="10.0.0.9",
                                  listener="mqtt")).addBoth(out.append)
    assert out == []  # the next answer from that source waits
    clock.advance(1.0)
    assert out and out[0].name == "alice"


def test_passwords_still_work_when_tokens_are_enabled(directory):
    gate = token_gate(directory, Clock())
    assert login(gate, b"s3cret", username="alice").name == "alice"
    assert isinstance(login(gate, b"wrong", username="alice"), Failure)


def test_a_token_is_not_a_password_when_jwt_is_off(directory):
    gate = PolicyGate(directory, Clock(), throttle=LoginThrottle(Clock(), base_delay_s=0))
    assert isinstance(login(gate, hs256(claims()), username="alice"), Failure)
    assert isinstance(login(gate, hs256(claims()), mechanism="token"), Failure)


def test_open_policy_gate_reads_the_jwt_settings(tmp_path, directory):
    secret = tmp_path / "s"
    secret.write_bytes(SECRET)
    os.chmod(secret, 0o600)
    gate = open_policy_gate(MemoryMetadataStore(), Clock(), jwt_secret_file=str(secret), jwt_audience="tg",
                            jwt_username_claim="name", login_delay_ms=0)
    assert gate.tokens is not None and gate.tokens.audience == "tg" and gate.tokens.username_claim == "name"
    gate.directory.add_user("carol", b"pw")
    assert login(gate, hs256({"name": "carol", "aud": "tg", "exp": int(time.time()) + 60})).name == "carol"
