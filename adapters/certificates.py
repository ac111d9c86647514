"""Who a verified client certificate names: the rule behind `AdapterConnection.peer_certificate_identity`.

The TLS context (gateway/tls.py) only lets a client certificate through when it verifies against the configured
CA bundle, so a certificate present on a connection is a verified one. `[tls] identity` picks the name:
"cn" (the subject's common name), or the first subject alternative name of a kind: "san_dns", "san_email",
"san_uri". A certificate without that field names nobody ('').
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

IDENTITY_RULES = ("cn", "san_dns", "san_email", "san_uri")
_SAN_TYPES: dict[str, Any] = {"san_dns": x509.DNSName, "san_email": x509.RFC822Name,
                              "san_uri": x509.UniformResourceIdentifier}


def certificate_identity(certificate: x509.Certificate, rule: str = "cn") -> str:
    """The user name `rule` reads from `certificate`, or '' when the certificate has no such field."""
    if rule == "cn":
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        value = names[0].value if names else ""
        return value if isinstance(value, str) else value.decode("utf-8", "replace")
    kind = _SAN_TYPES.get(rule)
    if kind is None:
        raise ValueError(f"unknown certificate identity rule {rule!r}; use one of {', '.join(IDENTITY_RULES)}")
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    values = san.get_values_for_type(kind)
    return str(values[0]) if values else ""


def peer_certificate(transport: Any) -> x509.Certificate | None:
    """The client certificate of a TLS transport (Twisted's TLS protocol, or a WebSocket wrapper around one),
    or None for plain transports and clients that sent none."""
    for _ in range(4):  # the TLS transport itself, or up to a few wrappers down (WebSocket over TLS)
        if transport is None:
            return None
        get_peer = getattr(transport, "getPeerCertificate", None)
        if get_peer is not None:
            try:
                certificate = get_peer()
            except Exception:  # not a TLS connection after all, or closed meanwhile
                return None
            return certificate.to_cryptography() if certificate is not None else None
        transport = getattr(transport, "transport", None)
    return None
