"""pika over TLS against the AMQPS listener (`[listeners.amqp] tls_enabled`, a 5671-type port, here ephemeral):
SASL PLAIN over TLS, SASL EXTERNAL with a client certificate (offered only on connections that have a verified
one), and mTLS `verify = "required"` refusing a client without a certificate. The PKI is made at test time by
tests/security/certs.py.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import ssl
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pika
import pytest
from pika.exceptions import AMQPConnectionError, ProbableAuthenticationError

from tidegate.gateway.testing import BrokerProcess

TIMEOUT = 15.0
ADMIN_PASSWORD = "adminpw-amqps"


def load_certs_module() -> ModuleType:
    """tests/security/certs.py by path (the interop suite is not a package of the tests tree)."""
    path = Path(__file__).resolve().parent.parent / "tests" / "security" / "certs.py"
    spec = importlib.util.spec_from_file_location("tidegate_test_certs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory):
    return load_certs_module().make_pki(tmp_path_factory.mktemp("pki"))


def amqps_broker(root: Path, pki, verify: str) -> BrokerProcess:
    settings = {
        "security.login_delay_ms": "0",
        "tls.cert_file": pki.server_chain, "tls.key_file": pki.server_key, "tls.ca_file": pki.client_ca_bundle,
        "tls.verify": verify,
        "listeners.amqp.tls_enabled": "true", "listeners.amqp.tls_port": "0",
    }
    args = [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]
    return BrokerProcess(root / "data", "--log-level", "warning", *args, listeners=("native", "admin", "amqp"),
                         env={"TIDEGATE_ADMIN_PASSWORD": ADMIN_PASSWORD})


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, pki) -> Iterator[BrokerProcess]:
    process = amqps_broker(tmp_path_factory.mktemp("amqps"), pki, "optional").start()
    try:
        token = base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()
        for path, body in (("users", {"name": "alice"}),
                           ("users", {"name": "svc", "password": "svc-secret"}),
                           *(("policies", {"owner": f"user:{user}", "resource": resource, "actions": ["All"],
                                           "decision": "Allow"})
                             for user in ("svc", "alice") for resource in ("Topic:*", "Group:*"))):
            request = urllib.request.Request(f"http://{process.address('admin')}/api/security/{path}",
                                             data=json.dumps(body).encode(), method="POST",
                                             headers={"Authorization": f"Basic {token}",
                                                      "Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=TIMEOUT).close()
        yield process
    finally:
        assert process.stop() == 0, process.log()


def tls_parameters(broker: BrokerProcess, pki, *, identity=None, credentials=None) -> pika.ConnectionParameters:
    context = ssl.create_default_context(cafile=str(pki.root_ca))
    if identity is not None:
        context.load_cert_chain(str(identity.cert_file), str(identity.key_file))
    host, port = broker.host_port("amqp_tls")
    return pika.ConnectionParameters(host="localhost", port=port, virtual_host="/",
                                     credentials=credentials or pika.PlainCredentials("guest", "guest"),
                                     ssl_options=pika.SSLOptions(context, server_hostname="localhost"),
                                     blocked_connection_timeout=TIMEOUT, socket_timeout=TIMEOUT,
                                     connection_attempts=1)


def round_trip(connection: pika.BlockingConnection, name: str) -> bytes:
    channel = connection.channel()
    channel.queue_declare(name, exclusive=True)
    channel.basic_publish("", name, b"over amqps")
    for _method, _properties, body in channel.consume(name, auto_ack=True, inactivity_timeout=TIMEOUT):
        channel.cancel()
        return body
    raise AssertionError("nothing consumed")


def test_listeners_json_names_the_amqps_address(broker: BrokerProcess) -> None:
    assert broker.address("amqp_tls").startswith("127.0.0.1:")


def test_pika_plain_over_tls(broker: BrokerProcess, pki) -> None:
    """SASL PLAIN (a user with a password) over the AMQPS port, the broker's chain verified from the root."""
    parameters = tls_parameters(broker, pki, credentials=pika.PlainCredentials("svc", "svc-secret"))
    with pika.BlockingConnection(parameters) as connection:
        assert round_trip(connection, "amqps-plain") == b"over amqps"


def test_pika_external_logs_in_as_the_certificate_identity(broker: BrokerProcess, pki) -> None:
    """SASL EXTERNAL with alice's certificate: connection.start offers EXTERNAL and the login is alice."""
    parameters = tls_parameters(broker, pki, identity=pki.alice, credentials=pika.credentials.ExternalCredentials())
    with pika.BlockingConnection(parameters) as connection:
        assert round_trip(connection, "amqps-external") == b"over amqps"


def test_external_is_not_offered_without_a_client_certificate(broker: BrokerProcess, pki) -> None:
    """No certificate, no EXTERNAL in connection.start: pika finds no mechanism it can use."""
    parameters = tls_parameters(broker, pki, credentials=pika.credentials.ExternalCredentials())
    with pytest.raises(AMQPConnectionError):
        pika.BlockingConnection(parameters)


def test_external_with_a_certificate_naming_no_user_is_refused(broker: BrokerProcess, pki) -> None:
    """bob's certificate verifies but no user bob exists: 403 ACCESS_REFUSED."""
    parameters = tls_parameters(broker, pki, identity=pki.bob, credentials=pika.credentials.ExternalCredentials())
    with pytest.raises(ProbableAuthenticationError):
        pika.BlockingConnection(parameters)


def test_verify_required_refuses_a_client_without_certificate(tmp_path: Path, pki) -> None:
    """tls.verify = "required" (with tls.ca_file, which used to stop the broker from starting): a client without
    a certificate cannot complete the connection; one with alice's certificate can."""
    with amqps_broker(tmp_path, pki, "required") as process:
        with pytest.raises(AMQPConnectionError):
            pika.BlockingConnection(tls_parameters(process, pki))
        parameters = tls_parameters(process, pki, identity=pki.alice)
        with pika.BlockingConnection(parameters) as connection:  # PLAIN guest/guest from loopback, with a cert
            assert round_trip(connection, "amqps-required") == b"over amqps"
