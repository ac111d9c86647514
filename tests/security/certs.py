"""A throw-away PKI made with `cryptography` at test time (nothing secret is committed).

    root CA ── intermediate CA ── server (localhost, 127.0.0.1; RSA so static-RSA suites would be possible)
    client CA ── alice, bob (valid), expired (notAfter in the past)
    other client CA (also in the bundle: a bundle of several CAs)
    rogue CA ── mallory (trusted by nobody)

`server_chain` holds the server certificate followed by the intermediate: a client that trusts only the root
verifies it only when the server sends the whole chain. `client_ca_bundle` holds two CAs.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PEM = serialization.Encoding.PEM


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class Issuer:
    name: x509.Name
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    certificate: x509.Certificate


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> Path:
    path.write_bytes(key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def make_ca(common_name: str, issuer: Issuer | None = None, *, path_length: int | None = 1) -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    signer = issuer or Issuer(name, key, None)  # type: ignore[arg-type]
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(signer.name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(_now() - datetime.timedelta(hours=1))
               .not_valid_after(_now() + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
    return Issuer(name, key, builder.sign(signer.key, hashes.SHA256()))


def make_leaf(issuer: Issuer, common_name: str, *, server: bool, dns: tuple[str, ...] = (),
              emails: tuple[str, ...] = (), ips: tuple[str, ...] = (), rsa_key: bool = False,
              not_after: datetime.datetime | None = None,
              not_before: datetime.datetime | None = None) -> tuple[x509.Certificate, object]:
    key = rsa.generate_private_key(65537, 2048) if rsa_key else ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.RFC822Name(e) for e in emails]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
               .issuer_name(issuer.name).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before or _now() - datetime.timedelta(hours=1))
               .not_valid_after(not_after or _now() + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
                              critical=False))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer.key, hashes.SHA256()), key


@dataclass
class ClientIdentity:
    cert_file: Path
    key_file: Path


@dataclass
class Pki:
    directory: Path
    root_ca: Path  # trust anchor of the server chain (the only file a client needs)
    intermediate_ca: Path
    server_chain: Path  # server certificate + intermediate
    server_leaf_only: Path  # the server certificate alone (what the old code sent)
    server_key: Path
    client_ca_bundle: Path  # two CAs; client certificates are signed by the second
    alice: ClientIdentity  # CN alice, SAN email alice@example.com, SAN DNS alice.devices.example
    bob: ClientIdentity  # CN bob
    expired: ClientIdentity  # CN alice, expired yesterday
    mallory: ClientIdentity  # CN alice, signed by a CA nobody trusts

    def new_server_certificate(self, common_name: str = "localhost") -> tuple[Path, Path, x509.Certificate]:
        """A fresh server certificate from the same intermediate (different serial and not-after), written to
        new files: (chain file, key file, certificate) for reload tests."""
        intermediate = _issuer(self.intermediate_ca, self.directory / "intermediate.key")
        later = _now() + datetime.timedelta(days=30)
        cert, key = make_leaf(intermediate, common_name, server=True, dns=("localhost",), ips=("127.0.0.1",),
                              not_after=later)
        index = len(list(self.directory.glob("server-new-*.pem")))
        chain = self.directory / f"server-new-{index}.pem"
        chain.write_bytes(cert.public_bytes(PEM) + intermediate.certificate.public_bytes(PEM))
        return chain, _write_key(self.directory / f"server-new-{index}.key", key), cert


def _issuer(cert_path: Path, key_path: Path) -> Issuer:
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    return Issuer(certificate.subject, key, certificate)  # type: ignore[arg-type]


def _client(directory: Path, name: str, issuer: Issuer, common_name: str, **kwargs: object) -> ClientIdentity:
    cert, key = make_leaf(issuer, common_name, server=False, **kwargs)  # type: ignore[arg-type]
    cert_file = directory / f"{name}.pem"
    cert_file.write_bytes(cert.public_bytes(PEM))
    return ClientIdentity(cert_file, _write_key(directory / f"{name}.key", key))


def make_pki(directory: Path) -> Pki:
    """Write the whole PKI into `directory` (PEM files, keys 0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    root = make_ca("Tidegate test root CA")
    intermediate = make_ca("Tidegate test intermediate CA", root, path_length=0)
    server, server_key = make_leaf(intermediate, "localhost", server=True, dns=("localhost",), ips=("127.0.0.1",),
                                   rsa_key=True)
    other_client_ca = make_ca("Tidegate test other client CA")
    client_ca = make_ca("Tidegate test client CA")
    rogue = make_ca("Tidegate test rogue CA")

    def write(name: str, *certificates: x509.Certificate) -> Path:
        path = directory / name
        path.write_bytes(b"".join(c.public_bytes(PEM) for c in certificates))
        return path

    _write_key(directory / "intermediate.key", intermediate.key)
    yesterday = _now() - datetime.timedelta(days=1)
    return Pki(
        directory=directory,
        root_ca=write("root-ca.pem", root.certificate),
        intermediate_ca=write("intermediate-ca.pem", intermediate.certificate),
        server_chain=write("server-chain.pem", server, intermediate.certificate),
        server_leaf_only=write("server-leaf.pem", server),
        server_key=_write_key(directory / "server.key", server_key),
        client_ca_bundle=write("client-cas.pem", other_client_ca.certificate, client_ca.certificate),
        alice=_client(directory, "alice", client_ca, "alice", emails=("alice@example.com",),
                      dns=("alice.devices.example",)),
        bob=_client(directory, "bob", client_ca, "bob"),
        expired=_client(directory, "expired", client_ca, "alice", not_after=yesterday,
                        not_before=yesterday - datetime.timedelta(days=2)),
        mallory=_client(directory, "mallory", rogue, "alice"),
    )
