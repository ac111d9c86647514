"""MQTT over TLS (and secure WebSocket) with a throw-away CA made by the test: mosquitto_pub/sub `--cafile`, paho
`tls_set(ca_certs=...)`, and a plain-TCP client on the TLS port failing cleanly."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from tidegate.gateway.testing import BrokerProcess

TIMEOUT = 15.0


def make_certificates_with_cryptography(directory: Path) -> tuple[Path, Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Tidegate interop test CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)  # the broker refuses a private key other users can read
    return ca_file, cert_file, key_file


def make_certificates_with_openssl(openssl: str, directory: Path) -> tuple[Path, Path, Path]:
    ca_file, ca_key = directory / "ca.pem", directory / "ca.key"
    cert_file, key_file, csr = directory / "server.pem", directory / "server.key", directory / "server.csr"
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
                   "extendedKeyUsage=serverAuth\n")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
        "-subj", "/CN=Tidegate interop test CA", "-keyout", str(ca_key), "-out", str(ca_file))
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=localhost",
        "-keyout", str(key_file), "-out", str(csr))
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_file), "-CAkey", str(ca_key), "-CAcreateserial",
        "-days", "1", "-extfile", str(ext), "-out", str(cert_file))
    return ca_file, cert_file, key_file


def make_certificates(directory: Path, tool) -> tuple[Path, Path, Path]:
    """(CA, server certificate, server key) PEM files: with `cryptography` if importable, else the openssl CLI."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        return make_certificates_with_openssl(tool("openssl"), directory)
    return make_certificates_with_cryptography(directory)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory, tool):
    return make_certificates(tmp_path_factory.mktemp("pki"), tool)


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory, certificates):
    _, cert_file, key_file = certificates
    process = BrokerProcess(tmp_path_factory.mktemp("tls-broker") / "data",
                            "--set", f"tls.cert_file={cert_file}", "--set", f"tls.key_file={key_file}",
                            "--set", "listeners.mqtt.tls_enabled=true", "--set", "listeners.mqtt.tls_port=0",
                            "--set", "listeners.mqtt.wss_enabled=true", "--set", "listeners.mqtt.wss_port=0",
                            listeners=("native", "admin", "mqtt", "mqtt_ws"))
    with process:
        yield process


def test_listeners_json_names_the_tls_addresses(tls_broker):
    """With tls_enabled/wss_enabled, listeners.json has `mqtt_tls` and `mqtt_wss` next to the plain listeners."""
    assert {"mqtt", "mqtt_ws", "mqtt_tls", "mqtt_wss"} <= set(tls_broker.addresses)
    assert tls_broker.address("mqtt_tls").startswith("127.0.0.1:")


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_clients_publish_and_subscribe_over_tls_with_cafile(tls_broker, certificates, mosquitto, version):
    """mosquitto_sub/mosquitto_pub `--cafile ca.pem` against the mqtt_tls port verify the certificate and work."""
    ca_file = str(certificates[0])
    port = tls_broker.host_port("mqtt_tls")[1]
    sub = mosquitto.sub(port, f"secure/{version}/#", qos=1, version=version, extra=["--cafile", ca_file])
    mosquitto.pub(port, f"secure/{version}/a", "encrypted", qos=1, version=version, extra=["--cafile", ca_file])
    [got] = sub.wait_messages(1)
    assert (got.topic, got.payload) == (f"secure/{version}/a", b"encrypted")


def test_mosquitto_pub_refuses_a_server_it_cannot_verify(tls_broker, mosquitto, tool, tmp_path):
    """With an unrelated CA file mosquitto_pub fails the handshake: the certificate is really checked, so the
    previous test proves a verified connection."""
    other_ca = make_certificates(tmp_path, tool)[0]
    port = tls_broker.host_port("mqtt_tls")[1]
    done = mosquitto.pub(port, "secure/unverified", "x", qos=1, extra=["--cafile", str(other_ca)], check=False)
    assert done.returncode != 0


@pytest.mark.parametrize("transport", ["tcp", "websockets"])
def test_paho_with_tls_set_ca_certs_publishes_and_subscribes(tls_broker, certificates, paho_client, transport):
    """paho `tls_set(ca_certs=ca.pem)` on mqtt_tls (TCP) and mqtt_wss (secure WebSocket, /mqtt) round-trips."""
    ca_file = str(certificates[0])
    port = tls_broker.host_port("mqtt_tls" if transport == "tcp" else "mqtt_wss")[1]
    client = paho_client(f"paho-tls-{transport}", version=5, transport=transport)
    client.client.tls_set(ca_certs=ca_file)
    client.connect(port)
    client.subscribe(f"secure/paho/{transport}", qos=1)
    client.publish(f"secure/paho/{transport}", b"over tls", qos=1)
    [got] = client.wait_messages(1)
    assert got.payload == b"over tls"


def test_plain_tcp_client_on_the_tls_port_is_closed_without_an_mqtt_answer(tls_broker, certificates, raw_mqtt):
    """A plain MQTT CONNECT sent to the TLS port gets no CONNACK: the connection is closed, and the TLS listener
    keeps accepting verified clients afterwards."""
    host, port = tls_broker.host_port("mqtt_tls")
    plain = raw_mqtt(port)
    plain.send(plain.connect_packet("plain-on-tls", 4))
    received = b""
    while True:
        try:
            chunk = plain.sock.recv(65536)
        except ConnectionResetError:
            break
        except TimeoutError:
            raise AssertionError("the TLS port kept a plain-TCP connection open") from None
        if not chunk:
            break
        received += chunk
    assert not received.startswith(b"\x20"), f"plain client got an MQTT answer: {received!r}"

    context = ssl.create_default_context(cafile=str(certificates[0]))
    with socket.create_connection((host, port), timeout=TIMEOUT) as tcp, \
            context.wrap_socket(tcp, server_hostname="localhost") as tls:
        tls.sendall(plain.connect_packet("tls-after-plain", 4))
        assert tls.recv(4) == b"\x20\x02\x00\x00"  # CONNACK, accepted
