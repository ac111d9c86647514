"""TLS for every listener (pyOpenSSL through Twisted): one reloadable server context per TLS endpoint.

What a context enforces, from `[tls]` (gateway/config.py):
- a minimum protocol version (`min_version`, "1.2" by default, or "1.3");
- a TLS 1.2 cipher list (`ciphers`), by default ECDHE key exchange with AEAD ciphers only: no static-RSA key
  exchange (no forward secrecy), no CBC, no SHA-1 MACs. TLS 1.3 suites are all AEAD and keep OpenSSL's default;
- the whole chain of `cert_file` (leaf first, then intermediates) is sent, so clients that trust only the root
  CA can verify it; the key comes from its own file (`key_file`) and must match the certificate;
- client certificates (`verify` with `ca_file`, a bundle of one or more CAs): "required" refuses a handshake
  without a certificate signed by one of them, "optional" asks for one but lets clients without one in (they log
  in with a password or anonymously); a certificate that is presented must verify in both modes. "none" asks for
  none.

`ServerTls` is what `listenSSL` gets: it hands every new connection the *current* context, so `reload` (SIGHUP,
admin API) swaps certificates for new connections while existing ones keep the context they were accepted with.
`TlsMetrics` counts failed handshakes by listener and cause (`HANDSHAKE_FAILURE_CAUSES`, read from the fatal TLS
alert), writes a rate-limited audit line for them, and exposes each listener's certificate not-after as Prometheus
series.
"""

from __future__ import annotations

import datetime
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from OpenSSL import SSL
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from tidegate.core.security.audit import AuditLog

# Mozilla's "intermediate" TLS 1.2 list without the finite-field DHE suites: ECDHE only, AEAD only.
DEFAULT_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))
TLS_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}
VERIFY_MODES = ("none", "optional", "required")
FATAL_ALERT_LEVEL = 2

# Why a handshake failed: the label set of tidegate_tls_handshake_failures_total{listener,cause} (fixed, small).
NO_CERTIFICATE = "no_certificate"  # a client certificate is required and none was sent
UNTRUSTED_CERTIFICATE = "untrusted_certificate"  # not signed by a CA of tls.ca_file (or otherwise unverifiable)
EXPIRED_CERTIFICATE = "expired_certificate"  # the client certificate is expired (or not yet valid)
PROTOCOL_VERSION = "protocol_version"  # no TLS version in common (a client below min_version), or no TLS at all
NO_SHARED_CIPHER = "no_shared_cipher"
CLIENT_ALERT = "client_alert"  # the client gave up: typically it does not trust our certificate or host name
OTHER = "other"
HANDSHAKE_FAILURE_CAUSES = (NO_CERTIFICATE, UNTRUSTED_CERTIFICATE, EXPIRED_CERTIFICATE, PROTOCOL_VERSION,
                            NO_SHARED_CIPHER, CLIENT_ALERT, OTHER)
# TLS alert descriptions (RFC 8446 section 6) the server sends, by what they say about the client.
_ALERT_CAUSES = {
    40: "",  # handshake_failure: no shared cipher, or (TLS 1.2) no client certificate: told apart below
    42: UNTRUSTED_CERTIFICATE,  # bad_certificate
    43: UNTRUSTED_CERTIFICATE,  # unsupported_certificate
    44: UNTRUSTED_CERTIFICATE,  # certificate_revoked
    45: EXPIRED_CERTIFICATE,  # certificate_expired
    46: UNTRUSTED_CERTIFICATE,  # certificate_unknown
    48: UNTRUSTED_CERTIFICATE,  # unknown_ca
    70: PROTOCOL_VERSION,  # protocol_version
    71: NO_SHARED_CIPHER,  # insufficient_security
    116: NO_CERTIFICATE,  # certificate_required (TLS 1.3)
}


def handshake_failure_cause(where: int, ret: int, *, server_hello_sent: bool) -> str:
    """The cause of a fatal alert before the handshake finished (`where`/`ret` of the info callback)."""
    if not where & SSL.SSL_CB_WRITE:
        return CLIENT_ALERT  # the alert came from the client
    cause = _ALERT_CAUSES.get(ret & 0xFF, OTHER)
    if cause == "":
        # TLS 1.2 answers a missing required certificate with handshake_failure too, but only after the server
        # hello (a cipher was agreed); no shared cipher is found before it.
        cause = NO_CERTIFICATE if server_hello_sent else NO_SHARED_CIPHER
    return cause


class TlsConfigError(Exception):
    """A certificate or key file that cannot be read or does not match; reported in one line at start-up."""


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """The files and rules of the server contexts (config section `[tls]`)."""

    cert_file: str
    key_file: str
    ca_file: str = ""
    verify: str = "required"  # applies only with ca_file; without one no client certificate is asked for
    min_version: str = "1.2"
    ciphers: str = DEFAULT_CIPHERS

    @classmethod
    def from_config(cls, section: Any) -> TlsSettings:
        """From `[tls]` (any object with the same attribute names)."""
        return cls(cert_file=section.cert_file, key_file=section.key_file, ca_file=section.ca_file,
                   verify=section.verify, min_version=section.min_version, ciphers=section.ciphers or DEFAULT_CIPHERS)

    @property
    def client_certificates(self) -> str:
        """"none", "optional" or "required": what the server asks of clients."""
        return self.verify if self.ca_file else "none"


def _readable(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"cannot read TLS {what} {path!r}: {exc.strerror or exc}") from None


def _leaf_not_after(chain_pem: bytes, cert_file: str) -> float:
    try:
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    except ValueError as exc:
        raise TlsConfigError(f"tls.cert_file {cert_file!r} holds no PEM certificate: {exc}") from None
    return leaf.not_valid_after_utc.timestamp()


def _ssl_reason(error: SSL.Error) -> str:
    parts = [entry[2] for entry in error.args[0] if isinstance(entry, tuple) and len(entry) == 3] \
        if error.args and isinstance(error.args[0], list) else []
    return ", ".join(parts) or str(error)


@dataclass(frozen=True, slots=True)
class LoadedContext:
    context: SSL.Context
    not_after: float  # unix seconds of the leaf certificate's notAfter


def build_server_context(settings: TlsSettings, *, session_id: bytes = b"tidegate",
                         info_callback: Any = None) -> LoadedContext:
    """A server SSL.Context from the files of `settings`; every problem is one `TlsConfigError` line that names
    the key and the file at fault."""
    if not settings.cert_file or not settings.key_file:
        raise TlsConfigError("a TLS listener needs tls.cert_file and tls.key_file")
    if settings.min_version not in TLS_VERSIONS:
        raise TlsConfigError(f"tls.min_version must be one of {', '.join(TLS_VERSIONS)}, not {settings.min_version!r}")
    if settings.verify not in VERIFY_MODES:
        raise TlsConfigError(f"tls.verify must be one of {', '.join(VERIFY_MODES)}, not {settings.verify!r}")
    chain_pem = _readable(settings.cert_file, "certificate (tls.cert_file)")
    _readable(settings.key_file, "key (tls.key_file)")
    not_after = _leaf_not_after(chain_pem, settings.cert_file)
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(TLS_VERSIONS[settings.min_version])
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION
                        | SSL.OP_SINGLE_ECDH_USE)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    try:
        context.set_cipher_list(settings.ciphers.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError) as exc:
        raise TlsConfigError(f"tls.ciphers {settings.ciphers!r} selects no usable cipher: {exc}") from None
    try:
        context.use_certificate_chain_file(settings.cert_file)  # leaf and intermediates, all sent
    except SSL.Error as exc:
        raise TlsConfigError(f"tls.cert_file {settings.cert_file!r}: {_ssl_reason(exc)}") from None
    try:
        context.use_privatekey_file(settings.key_file)
        context.check_privatekey()
    except SSL.Error as exc:
        raise TlsConfigError(f"tls.key_file {settings.key_file!r} is not the key of tls.cert_file "
                             f"{settings.cert_file!r} (or not a PEM key): {_ssl_reason(exc)}") from None
    mode = settings.client_certificates
    if mode != "none":
        ca_pem = _readable(settings.ca_file, "CA bundle (tls.ca_file)")
        try:
            if not x509.load_pem_x509_certificates(ca_pem):
                raise ValueError("no certificate")
            context.load_verify_locations(settings.ca_file.encode())
            context.load_client_ca(settings.ca_file.encode())  # the CA names sent with the certificate request
        except (SSL.Error, ValueError) as exc:
            raise TlsConfigError(f"tls.ca_file {settings.ca_file!r} is not a PEM bundle of CA certificates: "
                                 f"{exc}") from None
        flags = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if mode == "required" else 0)
        context.set_verify(flags)
        # Sessions resumed across listeners must not skip a client-certificate check: a context of its own.
        context.set_session_id(session_id[:32])
    if info_callback is not None:
        context.set_info_callback(info_callback)
    return LoadedContext(context, not_after)


class TlsMetrics:
    """Prometheus collector: failed TLS handshakes by listener and cause, and the server certificate's not-after.

    `audit` (the broker's AuditLog, set once it is open) gets a rate-limited line per failure."""

    def __init__(self, audit: AuditLog | None = None) -> None:
        self.handshake_failures: dict[tuple[str, str], int] = {}  # (listener, cause) -> count
        self.not_after: dict[str, float] = {}
        self.reloads = 0
        self.audit = audit

    def failed(self, listener: str, cause: str = OTHER, source: str = "") -> None:
        key = (listener, cause if cause in HANDSHAKE_FAILURE_CAUSES else OTHER)
        self.handshake_failures[key] = self.handshake_failures.get(key, 0) + 1
        if self.audit is not None:
            self.audit.tls_failure(listener=listener, cause=key[1], source=source)

    def failures(self, listener: str) -> int:
        """Every failed handshake of `listener`, whatever the cause."""
        return sum(n for (name, _), n in self.handshake_failures.items() if name == listener)

    def collect(self) -> Iterator[Any]:
        failures = CounterMetricFamily("tidegate_tls_handshake_failures",
                                       "TLS handshakes that ended in a fatal alert (either side), by listener and "
                                       "cause", labels=["listener", "cause"])
        for (listener, cause), count in sorted(self.handshake_failures.items()):
            failures.add_metric([listener, cause], count)
        yield failures
        expiry = GaugeMetricFamily("tidegate_tls_certificate_not_after_seconds",
                                   "notAfter of the server certificate a TLS listener presents (unix seconds)",
                                   labels=["listener"])
        for listener, when in sorted(self.not_after.items()):
            expiry.add_metric([listener], when)
        yield expiry
        yield CounterMetricFamily("tidegate_tls_reloads", "successful certificate reloads", value=self.reloads)


@implementer(IOpenSSLServerConnectionCreator)
class ServerTls:
    """One TLS listener's connection creator for `listenSSL`: each new connection gets the current context."""

    def __init__(self, settings: TlsSettings, listener: str, metrics: TlsMetrics | None = None) -> None:
        self.settings = settings
        self.listener = listener
        self.metrics = metrics if metrics is not None else TlsMetrics()
        self._handshaken: weakref.WeakSet[SSL.Connection] = weakref.WeakSet()
        self._hello_sent: weakref.WeakSet[SSL.Connection] = weakref.WeakSet()  # past the server hello
        self._current = self.prepare()
        self.install(self._current)

    def prepare(self, settings: TlsSettings | None = None) -> LoadedContext:
        """Build a context from the files as they are now (raises `TlsConfigError`); `install` makes it live."""
        return build_server_context(settings or self.settings, session_id=f"tidegate-{self.listener}".encode(),
                                    info_callback=self._info)

    def install(self, loaded: LoadedContext) -> None:
        self._current = loaded
        self.metrics.not_after[self.listener] = loaded.not_after

    def reload(self) -> float:
        """Re-read the files; new connections get the new certificate. Returns the new not-after."""
        loaded = self.prepare()
        self.install(loaded)
        return loaded.not_after

    @property
    def context(self) -> SSL.Context:
        return self._current.context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802, N803 (Twisted interface)
        return SSL.Connection(self._current.context, None)  # Twisted sets the protocol as its app data

    def _info(self, connection: SSL.Connection, where: int, ret: int) -> None:
        # A fatal alert, sent or received, before the handshake finished is a failed handshake: an untrusted or
        # missing client certificate, no shared cipher or version, a client refusing our certificate, garbage.
        if where & SSL.SSL_CB_HANDSHAKE_DONE:
            self._handshaken.add(connection)
            self._hello_sent.discard(connection)
        elif where & SSL.SSL_CB_ACCEPT_LOOP:
            if connection.get_state_string().endswith(b"write server hello"):
                self._hello_sent.add(connection)
        elif where & SSL.SSL_CB_ALERT and (ret >> 8) == FATAL_ALERT_LEVEL and connection not in self._handshaken:
            cause = handshake_failure_cause(where, ret, server_hello_sent=connection in self._hello_sent)
            self.metrics.failed(self.listener, cause, _peer_host(connection))


def _peer_host(connection: SSL.Connection) -> str:
    transport = getattr(connection.get_app_data(), "transport", None)  # the TLSMemoryBIOProtocol's TCP transport
    try:
        return str(transport.getPeer().host) if transport is not None else ""
    except Exception:  # a transport without an IP peer (tests, pipes): the line goes without a source
        return ""


def not_after_iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="seconds")


def server_tls_options(settings: TlsSettings, listener: str = "tls", metrics: TlsMetrics | None = None) -> ServerTls:
    """The connection creator a TLS endpoint listens with (gateway/app.py calls this for every TLS endpoint)."""
    return ServerTls(settings, listener, metrics)
