"""JWT bearer tokens as a password: the MQTT/AMQP PLAIN password or the native HELLO password may be a signed token.

Verification (PyJWT, with `cryptography` for RSA/EC):
- HS256 with a shared secret (`[security] jwt_secret_file`, at least 32 bytes, readable by the owner only);
- RS256 / ES256 with public keys from a JWKS file (`[security] jwt_jwks_file`; `kid` picks the key, reloaded when
  the file changes).
The accepted algorithm always follows from the *key*, never from the token's header: an RSA or EC key verifies
only RS256 or ES256, the secret only HS256. So `alg: none`, any other algorithm, and the classic confusion (an HS256
token "signed" with the RSA public key as HMAC secret) are refused. Symmetric (`oct`) keys in the JWKS file are
ignored: a JWKS file is public material.

Claims: `exp` is required; `exp`, `nbf` and `iat` are checked with a small leeway (`jwt_leeway_s`); `aud` must
contain `jwt_audience` when that is set (and a token carrying an `aud` is refused when it is not, as PyJWT does);
`iss` must equal `jwt_issuer` when that is set. The user name is the claim `jwt_username_claim` (default `sub`),
which must equal the user name given alongside the token, when one is given.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tidegate.core.security.keyfiles import read_private_file

MIN_SECRET_BYTES = 32  # RFC 7518 section 3.2: an HS256 key must be at least as long as the hash output
MAX_TOKEN_BYTES = 16 * 1024  # anything longer is not a token we issued; do not parse it
DEFAULT_LEEWAY_S = 30
HMAC_ALGORITHMS = ("HS256",)


class TokenError(Exception):
    """A token that is refused; the message says why (for logs and audit, never the token itself) and `cause` is
    one word of a small fixed set (a metrics label): malformed, algorithm, key, signature, expired, not_yet_valid,
    audience, issuer, claims, username."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


class TokenConfigError(Exception):
    """A JWT setting that cannot be used (missing file, short secret, unreadable JWKS): fails startup."""


def looks_like_jwt(password: bytes) -> bool:
    """Whether `password` has the compact JWS shape `header.payload.signature` with a JSON header naming `alg`.

    Cheap and conservative: a password that is not shaped like this is never treated as a token."""
    if not password or len(password) > MAX_TOKEN_BYTES or password.count(b".") != 2:
        return False
    header = password.split(b".", 1)[0]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + b"=" * (-len(header) % 4)))
    except (ValueError, binascii.Error):
        return False
    return isinstance(decoded, dict) and "alg" in decoded


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    username: str
    claims: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _PublicKey:
    kid: str
    algorithm: str  # RS256 or ES256, from the key type: never from the token
    key: Any


def _load_jwks(path: Path) -> list[_PublicKey]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TokenConfigError(f"cannot read jwt_jwks_file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise TokenConfigError(f"jwt_jwks_file {path} is not JSON: {exc}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise TokenConfigError(f"jwt_jwks_file {path} has no \"keys\" list")
    keys: list[_PublicKey] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise TokenConfigError(f"jwt_jwks_file {path}: key {index} is not an object")
        if entry.get("use", "sig") != "sig":
            continue
        kty = entry.get("kty")
        try:
            if kty == "RSA":
                key, algorithm = RSAAlgorithm.from_jwk(entry), "RS256"
            elif kty == "EC" and entry.get("crv") == "P-256":
                key, algorithm = ECAlgorithm.from_jwk(entry), "ES256"
            else:
                continue  # oct (a secret has no place in a public key set), other curves, OKP: not accepted
        except (jwt.InvalidKeyError, ValueError, KeyError, TypeError) as exc:
            raise TokenConfigError(f"jwt_jwks_file {path}: key {index} is not a valid {kty} key: {exc}") from None
        if hasattr(key, "private_numbers"):
            key = key.public_key()  # a private key in the file still only verifies
        if entry.get("alg") not in (None, algorithm):
            raise TokenConfigError(f"jwt_jwks_file {path}: key {index} says alg {entry.get('alg')!r}, but a {kty} "
                                   f"key verifies only {algorithm}")
        keys.append(_PublicKey(str(entry.get("kid", "")), algorithm, key))
    if not keys:
        raise TokenConfigError(f"jwt_jwks_file {path} holds no RSA or P-256 EC signing key")
    return keys


class TokenVerifier:
    """Checks bearer tokens against a secret and/or a JWKS file. Thread-safe (runs in the password thread pool)."""

    def __init__(self, *, secret: bytes | None = None, jwks_file: str | os.PathLike[str] | None = None,
                 audience: str = "", issuer: str = "", username_claim: str = "sub",
                 leeway_s: float = DEFAULT_LEEWAY_S) -> None:
        if secret is None and jwks_file is None:
            raise TokenConfigError("a token verifier needs jwt_secret_file or jwt_jwks_file")
        if secret is not None and len(secret) < MIN_SECRET_BYTES:
            raise TokenConfigError(f"jwt_secret_file holds {len(secret)} bytes; HS256 needs at least "
                                   f"{MIN_SECRET_BYTES}")
        if not username_claim:
            raise TokenConfigError("jwt_username_claim must not be empty")
        self.secret = secret
        self.jwks_path = Path(jwks_file) if jwks_file is not None else None
        self.audience = audience
        self.issuer = issuer
        self.username_claim = username_claim
        self.leeway_s = leeway_s
        self._lock = threading.Lock()
        self._keys: list[_PublicKey] = []
        self._jwks_stamp: tuple[int, int] | None = None
        if self.jwks_path is not None:
            self._refresh_jwks(strict=True)

    def _refresh_jwks(self, *, strict: bool = False) -> list[_PublicKey]:
        """Reload the JWKS file when its mtime or size changed; a broken rewrite keeps the old keys (logged by the
        caller as a refused login) so a half-written file never locks every client out."""
        assert self.jwks_path is not None
        try:
            st = self.jwks_path.stat()
        except OSError as exc:
            if strict:
                raise TokenConfigError(f"cannot read jwt_jwks_file {self.jwks_path}: {exc.strerror}") from None
            return self._keys
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._jwks_stamp:
                try:
                    self._keys = _load_jwks(self.jwks_path)
                    self._jwks_stamp = stamp
                except TokenConfigError:
                    if strict:
                        raise
            return self._keys

    def verify(self, token: bytes | str, username: str = "") -> VerifiedToken:
        """The verified token's user name and claims, or `TokenError` saying why it is refused."""
        raw = token.decode("ascii", "replace") if isinstance(token, bytes) else token
        if len(raw) > MAX_TOKEN_BYTES:
            raise TokenError("token too long", "malformed")
        try:
            header = jwt.get_unverified_header(raw)
        except jwt.DecodeError as exc:
            raise TokenError(f"malformed token: {exc}", "malformed") from None
        alg = header.get("alg")
        key, algorithm = self._key_for(alg, header.get("kid"))
        options: dict[str, Any] = {"require": ["exp"], "verify_aud": True, "verify_iss": bool(self.issuer)}
        try:
            claims = jwt.decode(raw, key=key, algorithms=[algorithm], audience=self.audience or None,
                                issuer=self.issuer or None, leeway=self.leeway_s, options=options)
        except jwt.ExpiredSignatureError:
            raise TokenError("token expired", "expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenError("token not yet valid (nbf/iat)", "not_yet_valid") from None
        except jwt.InvalidAudienceError:
            raise TokenError("token audience does not match", "audience") from None
        except jwt.InvalidIssuerError:
            raise TokenError("token issuer does not match", "issuer") from None
        except jwt.exceptions.InvalidSubjectError:
            raise TokenError("token subject is not a string", "claims") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError(f"token lacks the {exc.claim!r} claim", "claims") from None
        except jwt.InvalidSignatureError:
            raise TokenError("token signature does not verify", "signature") from None
        except jwt.PyJWTError as exc:
            raise TokenError(f"invalid token: {exc}", "malformed") from None
        subject = claims.get(self.username_claim)
        if not isinstance(subject, str) or not subject:
            raise TokenError(f"token has no string {self.username_claim!r} claim", "claims")
        if username and username != subject:
            raise TokenError(f"token {self.username_claim!r} claim does not match the user name given", "username")
        return VerifiedToken(subject, claims)

    def _key_for(self, alg: Any, kid: Any) -> tuple[Any, str]:
        if alg in HMAC_ALGORITHMS:
            if self.secret is None:
                raise TokenError(f"algorithm {alg} is not accepted (no jwt_secret_file)", "algorithm")
            return self.secret, "HS256"
        if alg in ("RS256", "ES256"):
            if self.jwks_path is None:
                raise TokenError(f"algorithm {alg} is not accepted (no jwt_jwks_file)", "algorithm")
            candidates = [k for k in self._refresh_jwks() if k.algorithm == alg]
            if kid is not None:
                candidates = [k for k in candidates if k.kid == kid]
            if not candidates:
                raise TokenError(f"no {alg} key{'' if kid is None else f' with kid {kid!r}'} in the JWKS file", "key")
            if len(candidates) > 1:
                raise TokenError(f"several {alg} keys match; the token must name one with kid", "key")
            return candidates[0].key, alg
        raise TokenError(f"algorithm {alg!r} is not accepted", "algorithm")


def open_token_verifier(*, jwt_secret_file: str = "", jwt_jwks_file: str = "", jwt_audience: str = "",
                        jwt_issuer: str = "", jwt_username_claim: str = "sub",
                        jwt_leeway_s: int = DEFAULT_LEEWAY_S) -> TokenVerifier | None:
    """The verifier the `[security] jwt_*` settings describe, or None when neither file is set."""
    if not jwt_secret_file and not jwt_jwks_file:
        return None
    secret = None
    if jwt_secret_file:
        secret = read_private_file(jwt_secret_file, "jwt_secret_file").strip()
    jwks = jwt_jwks_file or None
    if jwks is not None and not stat.S_ISREG(_stat_or_fail(jwks).st_mode):
        raise TokenConfigError(f"jwt_jwks_file {jwks} is not a regular file")
    return TokenVerifier(secret=secret, jwks_file=jwks, audience=jwt_audience, issuer=jwt_issuer,
                         username_claim=jwt_username_claim, leeway_s=jwt_leeway_s)


def _stat_or_fail(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as exc:
        raise TokenConfigError(f"cannot read jwt_jwks_file {path}: {exc.strerror}") from None
