"""The server TLS context (gateway/tls.py) on a real socket: ciphers offered, chain sent, versions, mTLS modes,
the client-certificate identity, handshake-failure metrics and reload without dropping connections.

The reactor runs in a daemon thread; clients are stdlib `ssl` sockets with timeouts (no sleeps). The server echoes
one line: the identity of the client certificate (`peer_certificate` + `certificate_identity`, the helpers every
adapter uses) or `-` without one.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import blockingCallFromThread

from tidegate.adapters.certificates import certificate_identity, peer_certificate
from tidegate.gateway.testing import wait_until
from tidegate.gateway.tls import ServerTls, TlsConfigError, TlsMetrics, TlsSettings, build_server_context

from .certs import ClientIdentity, Pki, make_pki

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def running_reactor():
    if not reactor.running:
        thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True)
        thread.start()
        started = threading.Event()
        reactor.callFromThread(started.set)
        assert started.wait(TIMEOUT), "reactor did not start"
    return reactor


class IdentityEcho(Protocol):
    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted)
        certificate = peer_certificate(self.transport)
        rule = self.factory.rule
        self.transport.write((certificate_identity(certificate, rule) if certificate else "-").encode() + b"\n")


class Server:
    def __init__(self, settings: TlsSettings, rule: str = "cn") -> None:
        self.metrics = TlsMetrics()
        self.tls = ServerTls(settings, "test_tls", self.metrics)
        factory = Factory.forProtocol(IdentityEcho)
        factory.rule = rule
        self.port = blockingCallFromThread(reactor, reactor.listenSSL, 0, factory, self.tls, interface="127.0.0.1")
        self.address = ("127.0.0.1", self.port.getHost().port)

    def stop(self) -> None:
        blockingCallFromThread(reactor, self.port.stopListening)

    @property
    def failures(self) -> int:
        return self.metrics.failures("test_tls")

    def causes(self) -> list[str]:
        return sorted(cause for (listener, cause), n in self.metrics.handshake_failures.items()
                      for _ in range(n) if listener == "test_tls")


@pytest.fixture
def serve(running_reactor, pki: Pki) -> Iterator:
    servers: list[Server] = []

    def start(rule: str = "cn", **overrides: object) -> Server:
        fields = {"cert_file": str(pki.server_chain), "key_file": str(pki.server_key), **overrides}
        server = Server(TlsSettings(**fields), rule)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def client_context(pki: Pki, *, ca: Path | None = None, identity: ClientIdentity | None = None,
                   ciphers: str | None = None, max_version: ssl.TLSVersion | None = None,
                   min_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(ca or pki.root_ca))
    if identity is not None:
        context.load_cert_chain(str(identity.cert_file), str(identity.key_file))
    if ciphers is not None:
        context.set_ciphers(ciphers + ":@SECLEVEL=0")  # offer exactly these, even weak ones: the server must refuse
    if min_version is not None:
        context.minimum_version = min_version
    if max_version is not None:
        context.maximum_version = max_version
    return context


def exchange(server: Server, context: ssl.SSLContext, hostname: str = "localhost") -> str:
    """Handshake, send one byte, return the server's answer; raises on a failed handshake. (With TLS 1.3 a refused
    client certificate shows on the first read, after the client's side of the handshake completed.)"""
    with socket.create_connection(server.address, timeout=TIMEOUT) as raw, \
            context.wrap_socket(raw, server_hostname=hostname) as tls:
        tls.sendall(b"?")
        answer = tls.recv(1024)
        if not answer:
            raise ConnectionResetError("closed without an answer")
        return answer.decode().strip()


def refused(server: Server, context: ssl.SSLContext) -> bool:
    try:
        exchange(server, context)
    except (ssl.SSLError, ConnectionError, OSError):
        return True
    return False


# ------------------------------------------------------------------------------------------------ ciphers, versions
@pytest.mark.parametrize("cipher", ["AES128-SHA", "AES256-GCM-SHA384", "ECDHE-RSA-AES128-SHA", "ECDHE-RSA-AES256-SHA"])
def test_default_ciphers_refuse_static_rsa_and_cbc_sha1_suites(serve, pki: Pki, cipher: str) -> None:
    """A TLS 1.2 client offering only a static-RSA key exchange or a CBC-SHA1 suite finds no shared cipher (the
    server's RSA certificate would allow static RSA: the cipher list is what refuses it)."""
    server = serve()
    assert refused(server, client_context(pki, ciphers=cipher, max_version=ssl.TLSVersion.TLSv1_2))
    assert server.failures >= 1


def test_default_ciphers_accept_ecdhe_with_aead(serve, pki: Pki) -> None:
    """ECDHE-RSA-AES128-GCM-SHA256 (and TLS 1.3) complete the handshake."""
    server = serve()
    assert exchange(server, client_context(pki, ciphers="ECDHE-RSA-AES128-GCM-SHA256",
                                           max_version=ssl.TLSVersion.TLSv1_2)) == "-"
    assert exchange(server, client_context(pki, min_version=ssl.TLSVersion.TLSv1_3)) == "-"
    assert server.failures == 0


def test_configured_cipher_list_is_used(serve, pki: Pki) -> None:
    """`ciphers` replaces the default: with only CHACHA20 configured, an AES-GCM-only TLS 1.2 client is refused."""
    server = serve(ciphers="ECDHE-RSA-CHACHA20-POLY1305")
    assert refused(server, client_context(pki, ciphers="ECDHE-RSA-AES128-GCM-SHA256",
                                          max_version=ssl.TLSVersion.TLSv1_2))
    assert exchange(server, client_context(pki, ciphers="ECDHE-RSA-CHACHA20-POLY1305",
                                           max_version=ssl.TLSVersion.TLSv1_2)) == "-"


def test_minimum_version_is_configurable(serve, pki: Pki) -> None:
    """min_version "1.3" refuses a TLS 1.2 client; the default 1.2 accepts it."""
    assert refused(serve(min_version="1.3"), client_context(pki, max_version=ssl.TLSVersion.TLSv1_2))
    assert exchange(serve(), client_context(pki, max_version=ssl.TLSVersion.TLSv1_2)) == "-"


def test_a_cipher_list_that_selects_nothing_is_a_config_error(pki: Pki) -> None:
    with pytest.raises(TlsConfigError, match="tls.ciphers"):
        build_server_context(TlsSettings(str(pki.server_chain), str(pki.server_key), ciphers="NO-SUCH-CIPHER"))


# ------------------------------------------------------------------------------------------------ chain and key
def test_the_whole_chain_is_sent_so_a_client_trusting_only_the_root_verifies(serve, pki: Pki) -> None:
    """cert_file = server certificate + intermediate: a client with only the root CA verifies the server."""
    assert exchange(serve(), client_context(pki, ca=pki.root_ca)) == "-"


def test_a_leaf_only_certificate_file_cannot_be_verified_from_the_root(serve, pki: Pki) -> None:
    """The control for the test above: without the intermediate in the file, the root-only client fails."""
    assert refused(serve(cert_file=str(pki.server_leaf_only)), client_context(pki, ca=pki.root_ca))


def test_key_file_that_does_not_match_the_certificate_is_one_clear_error(pki: Pki) -> None:
    with pytest.raises(TlsConfigError, match="tls.key_file .* is not the key of tls.cert_file"):
        build_server_context(TlsSettings(str(pki.server_chain), str(pki.alice.key_file)))


def test_unreadable_files_name_the_key(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(TlsConfigError, match=r"tls.cert_file"):
        build_server_context(TlsSettings(str(tmp_path / "missing.pem"), str(pki.server_key)))
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(TlsConfigError, match=r"tls.ca_file"):
        build_server_context(TlsSettings(str(pki.server_chain), str(pki.server_key), ca_file=str(garbage)))


def test_ca_file_builds_a_context_requiring_client_certificates(pki: Pki) -> None:
    """Regression: `tls.ca_file` used to stop the broker from starting (trustRoot + requireCertificate)."""
    loaded = build_server_context(TlsSettings(str(pki.server_chain), str(pki.server_key),
                                              ca_file=str(pki.client_ca_bundle)))
    assert loaded.context.get_verify_mode() != 0


# ------------------------------------------------------------------------------------------------ mTLS
def test_required_accepts_a_certificate_from_the_second_ca_of_the_bundle(serve, pki: Pki) -> None:
    """verify=required with a bundle of two CAs: alice (signed by the second) gets in and is named by her CN."""
    server = serve(ca_file=str(pki.client_ca_bundle), verify="required")
    assert exchange(server, client_context(pki, identity=pki.alice)) == "alice"


@pytest.mark.parametrize("who", ["none", "mallory", "expired"])
def test_required_refuses_no_untrusted_and_expired_certificates(serve, pki: Pki, who: str) -> None:
    """verify=required: no certificate, one from an untrusted CA, or an expired one: the handshake fails, and
    the failure is counted."""
    server = serve(ca_file=str(pki.client_ca_bundle), verify="required")
    identity = None if who == "none" else getattr(pki, who)
    assert refused(server, client_context(pki, identity=identity))
    assert server.failures == 1


def test_optional_lets_clients_without_a_certificate_in_but_not_untrusted_ones(serve, pki: Pki) -> None:
    server = serve(ca_file=str(pki.client_ca_bundle), verify="optional")
    assert exchange(server, client_context(pki)) == "-"
    assert exchange(server, client_context(pki, identity=pki.bob)) == "bob"
    assert refused(server, client_context(pki, identity=pki.mallory))
    assert refused(server, client_context(pki, identity=pki.expired))


def test_verify_none_asks_for_no_certificate(serve, pki: Pki) -> None:
    """With verify=none a client certificate is never requested, so no identity reaches the adapter."""
    server = serve(ca_file=str(pki.client_ca_bundle), verify="none")
    assert exchange(server, client_context(pki, identity=pki.alice)) == "-"


@pytest.mark.parametrize(("rule", "expected"), [("cn", "alice"), ("san_dns", "alice.devices.example"),
                                                 ("san_email", "alice@example.com"), ("san_uri", "")])
def test_identity_rule_picks_cn_or_a_san(serve, pki: Pki, rule: str, expected: str) -> None:
    server = serve(rule, ca_file=str(pki.client_ca_bundle))
    assert exchange(server, client_context(pki, identity=pki.alice)) == expected


def test_certificate_identity_of_a_certificate_without_cn() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    import datetime

    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(x509.Name([]))
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    assert certificate_identity(cert, "cn") == ""
    assert certificate_identity(cert, "san_dns") == ""
    with pytest.raises(ValueError, match="unknown certificate identity rule"):
        certificate_identity(cert, "serial")


# ------------------------------------------------------------------------------------------------ reload, metrics
def served_serial(server: Server, pki: Pki) -> int:
    with socket.create_connection(server.address, timeout=TIMEOUT) as raw, \
            client_context(pki).wrap_socket(raw, server_hostname="localhost") as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def test_reload_serves_new_connections_the_new_certificate_and_keeps_open_ones(serve, pki: Pki) -> None:
    server = serve()
    old_serial = served_serial(server, pki)
    raw = socket.create_connection(server.address, timeout=TIMEOUT)
    kept = client_context(pki).wrap_socket(raw, server_hostname="localhost")
    try:
        kept.sendall(b"?")
        assert kept.recv(16) == b"-\n"
        chain, key, new_certificate = pki.new_server_certificate()
        server.tls.settings = TlsSettings(str(chain), str(key))
        blockingCallFromThread(reactor, server.tls.reload)
        assert served_serial(server, pki) == new_certificate.serial_number != old_serial
        assert server.metrics.not_after["test_tls"] == new_certificate.not_valid_after_utc.timestamp()
        kept.sendall(b"?")  # the connection accepted before the reload still works
        assert kept.recv(16) == b"-\n"
    finally:
        kept.close()


def test_a_failed_reload_keeps_the_old_certificate(serve, pki: Pki, tmp_path: Path) -> None:
    server = serve()
    before = served_serial(server, pki)
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    server.tls.settings = TlsSettings(str(broken), str(pki.server_key))
    with pytest.raises(TlsConfigError):
        blockingCallFromThread(reactor, server.tls.reload)
    assert served_serial(server, pki) == before


def test_metrics_expose_failures_and_not_after_by_listener(serve, pki: Pki) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    server = serve(ca_file=str(pki.client_ca_bundle))
    refused(server, client_context(pki))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(server.metrics)
    text = generate_latest(registry).decode()
    assert 'tidegate_tls_handshake_failures_total{cause="no_certificate",listener="test_tls"} 1.0' in text
    leaf = x509.load_pem_x509_certificates(pki.server_chain.read_bytes())[0]
    value = float(text.split('tidegate_tls_certificate_not_after_seconds{listener="test_tls"} ')[1].split()[0])
    assert value == leaf.not_valid_after_utc.timestamp()


def test_peer_certificate_is_found_under_a_websocket_wrapper(pki: Pki) -> None:
    """MQTT over WSS: the adapter's transport is the WebSocket wrapper, whose own transport is the TLS one."""
    from OpenSSL import crypto

    certificate = crypto.X509.from_cryptography(x509.load_pem_x509_certificate(pki.alice.cert_file.read_bytes()))

    class TlsTransport:
        def getPeerCertificate(self):  # noqa: N802 (Twisted's name)
            return certificate

    class WebSocketWrapper:
        transport = TlsTransport()

    found = peer_certificate(WebSocketWrapper())
    assert found is not None and certificate_identity(found, "cn") == "alice"
    assert peer_certificate(object()) is None


# ------------------------------------------------------------------------------------------------ failure causes
@pytest.mark.parametrize(("who", "version", "cause"), [
    ("none", ssl.TLSVersion.TLSv1_3, "no_certificate"),
    ("none", ssl.TLSVersion.TLSv1_2, "no_certificate"),
    ("mallory", ssl.TLSVersion.TLSv1_3, "untrusted_certificate"),
    ("mallory", ssl.TLSVersion.TLSv1_2, "untrusted_certificate"),
    ("expired", ssl.TLSVersion.TLSv1_3, "expired_certificate"),
    ("expired", ssl.TLSVersion.TLSv1_2, "expired_certificate"),
])
def test_a_refused_client_certificate_is_counted_under_its_cause(serve, pki: Pki, who: str,
                                                                  version: ssl.TLSVersion, cause: str) -> None:
    server = serve(ca_file=str(pki.client_ca_bundle), verify="required")
    identity = None if who == "none" else getattr(pki, who)
    assert refused(server, client_context(pki, identity=identity, max_version=version))
    assert server.causes() == [cause]


def test_no_common_version_or_cipher_is_counted_under_its_cause(serve, pki: Pki) -> None:
    server = serve(min_version="1.3")
    assert refused(server, client_context(pki, max_version=ssl.TLSVersion.TLSv1_2))
    assert server.causes() == ["protocol_version"]
    server = serve()
    assert refused(server, client_context(pki, ciphers="AES128-SHA", max_version=ssl.TLSVersion.TLSv1_2))
    assert server.causes() == ["no_shared_cipher"]


def test_a_client_refusing_our_certificate_is_a_client_alert(serve, pki: Pki) -> None:
    """A client that does not trust the server's certificate ends the handshake with its own alert."""
    server = serve()
    assert refused(server, client_context(pki, ca=pki.mallory.cert_file))
    wait_until(lambda: server.causes() == ["client_alert"], TIMEOUT, "the client's alert to be counted")


def test_handshake_failures_write_rate_limited_audit_lines_with_the_source(serve, pki: Pki, tmp_path: Path) -> None:
    """One audit line per (listener, cause) and interval, naming the client's address; later ones are counted in
    the next line's repeats (here: the summary written at close)."""
    import json

    from tidegate.core.security.audit import AuditLog

    audit_file = tmp_path / "audit.jsonl"
    server = serve(ca_file=str(pki.client_ca_bundle), verify="required")
    server.metrics.audit = AuditLog(audit_file)
    for _ in range(3):
        assert refused(server, client_context(pki, identity=pki.mallory))
    assert refused(server, client_context(pki))
    server.metrics.audit.close()
    lines = [json.loads(line) for line in audit_file.read_text().splitlines()]
    assert [(e["event"], e["cause"], e["repeats"]) for e in lines] == [
        ("tls_handshake_failed", "untrusted_certificate", 1), ("tls_handshake_failed", "no_certificate", 1),
        ("tls_handshake_failed", "untrusted_certificate", 2)]
    assert lines[0]["listener"] == "test_tls" and lines[0]["source"] == "127.0.0.1"

