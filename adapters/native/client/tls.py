"""TLS for the SDK: `ClientTls` describes how to reach a broker's TLS listener (`[listeners.native] tls_port`).

    from tidegate.client import ClientTls, Producer
    tls = ClientTls(ca_file="ca.pem")                                     # verify the broker (the default)
    tls = ClientTls(ca_file="ca.pem", cert_file="me.pem", key_file="me.key")   # mTLS: log in as the certificate
    with Producer("broker.example:10912", tls=tls) as producer: ...

The server's certificate is always checked against `ca_file` (or the system's trust store without one), and its
name against the host the client connects to (or `server_hostname`) with service-identity (DNS names and IP
addresses in the subject alternative names), as Twisted does. `verify=False` turns both off, for throw-away
test setups only. TLS 1.2 is the minimum.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address

from tidegate.adapters.native.errors import ErrorCode
from tidegate.core.errors import TidegateError


class TlsError(TidegateError):
    """The TLS handshake with the broker failed, or its certificate does not name the host connected to."""

    code = ErrorCode.NOT_AUTHENTICATED


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class ClientTls:
    ca_file: str | None = None  # PEM CAs that sign the broker's certificate; None: the system trust store
    cert_file: str | None = None  # client certificate (chain) for mTLS
    key_file: str | None = None  # its key; None: the key is in cert_file
    server_hostname: str | None = None  # the name the certificate must carry; None: the host connected to
    verify: bool = True  # False: no certificate or name check at all (tests only)

    def ssl_context(self) -> ssl.SSLContext:
        """A stdlib client context (the blocking SDK); the name is checked by `check_hostname` afterwards."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = False  # service-identity checks the name (check_hostname), below
        if self.verify:
            if self.ca_file:
                context.load_verify_locations(self.ca_file)
            else:
                context.load_default_certs()
        else:
            context.verify_mode = ssl.CERT_NONE
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def name_for(self, host: str) -> str:
        return self.server_hostname or host

    def check_hostname(self, der_certificate: bytes | None, host: str) -> None:
        """Raise `TlsError` unless the certificate names `host` (service-identity rules)."""
        if not self.verify:
            return
        name = self.name_for(host)
        if der_certificate is None:
            raise TlsError(f"the broker at {host} sent no certificate")
        certificate = x509.load_der_x509_certificate(der_certificate)
        try:
            if _is_ip_address(name):
                verify_certificate_ip_address(certificate, name)
            else:
                verify_certificate_hostname(certificate, name)
        except (VerificationError, CertificateError) as exc:
            raise TlsError(f"the broker's certificate does not match {name!r}: {exc}") from None

    def wrap(self, sock: socket.socket, host: str) -> ssl.SSLSocket:
        """Handshake over a connected socket and check the broker's name; raises `TlsError`."""
        name = self.name_for(host)
        try:
            tls = self.ssl_context().wrap_socket(sock, server_hostname=None if _is_ip_address(name) else name)
        except ssl.SSLError as exc:
            sock.close()
            raise TlsError(f"TLS handshake with {host} failed: {exc.reason or exc}") from None
        try:
            self.check_hostname(tls.getpeercert(binary_form=True), host)
        except TlsError:
            tls.close()
            raise
        return tls

    def twisted_options(self, host: str) -> Any:
        """A Twisted client connection creator: `optionsForClientTLS` (service-identity name check)."""
        from twisted.internet import ssl as twisted_ssl

        client_certificate = None
        if self.cert_file:
            with open(self.cert_file, encoding="ascii") as cert_fh:
                pem = cert_fh.read()
            if self.key_file:
                with open(self.key_file, encoding="ascii") as key_fh:
                    pem += "\n" + key_fh.read()
            client_certificate = twisted_ssl.PrivateCertificate.loadPEM(pem)
        if not self.verify:
            return twisted_ssl.CertificateOptions(
                privateKey=client_certificate.privateKey.original if client_certificate else None,
                certificate=client_certificate.original if client_certificate else None,
                raiseMinimumTo=twisted_ssl.TLSVersion.TLSv1_2)
        trust_root = None
        if self.ca_file:
            with open(self.ca_file, encoding="ascii") as ca_fh:
                authorities = [twisted_ssl.Certificate.loadPEM(pem) for pem in _split_pem(ca_fh.read())]
            trust_root = twisted_ssl.trustRootFromCertificates(authorities)
        return twisted_ssl.optionsForClientTLS(self.name_for(host), trustRoot=trust_root,
                                               clientCertificate=client_certificate,
                                               extraCertificateOptions={
                                                   "raiseMinimumTo": twisted_ssl.TLSVersion.TLSv1_2})


def _split_pem(text: str) -> list[str]:
    end = "-----END CERTIFICATE-----"
    return [block.strip() + "\n" + end + "\n" for block in text.split(end) if "BEGIN CERTIFICATE" in block]
