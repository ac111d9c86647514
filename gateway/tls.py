"""TLS contexts for the listeners (pyOpenSSL through Twisted): TLS 1.2 at least, optional client certificates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import ssl


class TlsConfigError(Exception):
    """A certificate or key file that cannot be read or does not match; reported in one line at start-up."""


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise TlsConfigError(f"cannot read TLS {what} {path!r}: {exc}") from None


def server_tls_options(cert_file: str, key_file: str, ca_file: str | None = None) -> Any:
    """Context factory for listenSSL. With `ca_file`, clients must present a certificate signed by it (mTLS)."""
    if not cert_file or not key_file:
        raise TlsConfigError("a TLS listener needs tls.cert_file and tls.key_file")
    try:
        identity = ssl.PrivateCertificate.loadPEM(_read(cert_file, "certificate") + "\n" + _read(key_file, "key"))
        kwargs: dict[str, Any] = {}
        if ca_file:
            authority = ssl.Certificate.loadPEM(_read(ca_file, "CA certificate"))
            kwargs.update(trustRoot=ssl.trustRootFromCertificates([authority]), requireCertificate=True)
        return ssl.CertificateOptions(
            privateKey=identity.privateKey.original,
            certificate=identity.original,
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
            **kwargs,
        )
    except TlsConfigError:
        raise
    except Exception as exc:  # pyOpenSSL raises several types for bad PEM or a key that does not match
        raise TlsConfigError(f"invalid TLS certificate/key ({cert_file}, {key_file}): {exc}") from None
