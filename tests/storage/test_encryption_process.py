"""Encryption at rest end to end: a real `tidegate serve` with a keyring file, the native SDK and an MQTT client,
kill -9, wrong and missing keys at start-up, and `tidegate admin rotate-key`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tidegate.client import Admin, Producer, PullConsumer, PushConsumer
from tidegate.core.storage.encryption import add_key_to_file
from tidegate.core.storage.layout import StoreLayout
from tidegate.gateway import cli
from tidegate.gateway.testing import START_TIMEOUT_S, BrokerProcess, wait_until

TIMEOUT = 20.0
SECRET = b"PLAINTEXT-CARD-4111111111111111"
# Tiny segments (several rolls), and no decoded-message cache: every delivery reads and opens the stored record.
SETTINGS = ("--set", "storage.segment_bytes=65536", "--set", "broker.max_message_bytes=16384",
            "--set", "storage.index_entries_per_file=256", "--set", "broker.message_cache_bytes=0")


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "keys"
    add_key_to_file(path, "k1")
    return path


def encrypted_broker(data_dir, key_file, listeners=("native", "admin")) -> BrokerProcess:
    return BrokerProcess(data_dir, *SETTINGS, "--set", f"storage.encryption_key_file={key_file}", listeners=listeners)


def pull_all(address: str, topic: str) -> list:
    out = []
    with PullConsumer("verify", address=address) as consumer:
        offset = 0
        while True:
            result = consumer.pull(topic, 0, offset, max=256)
            if not result.messages:
                return out
            out.extend(delivered.message for delivered in result.messages)
            offset = result.next_offset


def segment_bytes(data_dir) -> bytes:
    layout = StoreLayout(data_dir)
    return b"".join(layout.segment_path(base).read_bytes() for base in layout.segment_bases())


def start_failure(process: BrokerProcess) -> tuple[int, str]:
    """Spawn a broker expected to refuse start-up: (exit code, its log)."""
    process.spawn()
    assert process.process is not None
    code = process.process.wait(timeout=START_TIMEOUT_S)
    process._close_log()
    return code, process.log()


def test_native_and_mqtt_clients_get_decrypted_payloads_and_the_disk_holds_no_plaintext(tmp_path, key_file):
    data = tmp_path / "data"
    mqtt_got: list[tuple[str, bytes]] = []
    native_got: list = []
    lock = threading.Lock()
    with encrypted_broker(data, key_file, ("native", "admin", "mqtt")) as broker:
        with Admin(address=broker.native) as admin:
            admin.create_topic("orders", queues=1)
        subscribed = threading.Event()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="reader", protocol=paho.MQTTv311)
        client.on_subscribe = lambda *args: subscribed.set()
        client.on_connect = lambda c, userdata, flags, reason, properties: c.subscribe("orders/#", qos=1)

        def on_message(c, userdata, msg) -> None:
            with lock:
                mqtt_got.append((msg.topic, msg.payload))

        client.on_message = on_message
        host, port = broker.host_port("mqtt")
        client.connect(host, port)
        client.loop_start()
        try:
            assert subscribed.wait(TIMEOUT)

            def handler(delivered) -> None:
                with lock:
                    native_got.append(delivered.message)

            with PushConsumer("g1", "orders", handler, address=broker.native, start="earliest"), \
                    Producer(address=broker.native) as producer:
                for n in range(5):
                    producer.send("orders", SECRET + b"-%d" % n, subject="eu/paris", properties={"iban": f"DE89-{n}"})
                wait_until(lambda: len(native_got) == 5 and len(mqtt_got) == 5, TIMEOUT, "both deliveries")
        finally:
            client.disconnect()
            client.loop_stop()
    assert sorted(m.body for m in native_got) == [SECRET + b"-%d" % n for n in range(5)]
    assert {(m.subject, m.properties["iban"][:4]) for m in native_got} == {("eu/paris", "DE89")}
    assert sorted(mqtt_got) == [("orders/eu/paris", SECRET + b"-%d" % n) for n in range(5)]
    on_disk = segment_bytes(data)
    assert on_disk and SECRET not in on_disk and b"DE89-" not in on_disk and b"eu/paris" not in on_disk
    with encrypted_broker(data, key_file) as broker:  # restart with the key: read back from disk
        assert [m.body for m in pull_all(broker.native, "orders")] == [SECRET + b"-%d" % n for n in range(5)]


def test_kill_9_with_encryption_on_keeps_every_acknowledged_message(tmp_path, key_file):
    data = tmp_path / "data"
    process = encrypted_broker(data, key_file).start()
    acked: list[bytes] = []
    try:
        with Admin(address=process.native) as admin:
            admin.create_topic("crash", queues=1)
        producer = Producer(address=process.native, timeout=5).start()
        stop = threading.Event()

        def send_forever() -> None:
            n = 0
            while not stop.is_set():
                body = SECRET + b"-%06d" % n + b"z" * 300
                try:
                    producer.send("crash", body)
                except Exception:  # the broker died under us: that send was never acknowledged
                    return
                acked.append(body)
                n += 1

        sender = threading.Thread(target=send_forever)
        sender.start()
        wait_until(lambda: len(acked) >= 300, 60, "300 acknowledged sends")
        process.kill()
        stop.set()
        sender.join(timeout=30)
        producer.close()
    finally:
        process.kill()
    with encrypted_broker(data, key_file) as broker:
        bodies = [m.body for m in pull_all(broker.native, "crash")]
    assert bodies[:len(acked)] == acked  # every acknowledged message, in order, decrypted
    assert "after an unclean shutdown" in broker.log()  # the restart really recovered from a crash
    assert SECRET not in segment_bytes(data)


def test_a_wrong_missing_or_exposed_key_refuses_start_up_with_a_clear_message(tmp_path, key_file):
    data = tmp_path / "data"
    with encrypted_broker(data, key_file) as broker, Producer(address=broker.native) as producer:
        producer.send("orders", SECRET)
    wrong = tmp_path / "wrong"
    add_key_to_file(wrong, "k1")  # same id, other key
    cases = [
        (encrypted_broker(data, wrong), "wrong encryption key: key 'k1'"),
        (BrokerProcess(data, *SETTINGS), "no encryption key is configured"),
        (BrokerProcess(data, *SETTINGS, "--set", "storage.encryption_key_env=TG_TEST_KEYS",
                       env={"TG_TEST_KEYS": ""}), "$TG_TEST_KEYS, which is not set or empty"),
    ]
    for process, why in cases:
        code, log = start_failure(process)
        assert code == 1 and why in log and "Traceback" not in log, log[-2000:]
    key_file.chmod(0o640)
    code, log = start_failure(encrypted_broker(data, key_file))
    assert code == 1 and "accessible by group or others" in log and "Traceback" not in log
    key_file.chmod(0o600)
    with encrypted_broker(data, key_file) as broker:  # the right key still opens everything
        assert [m.body for m in pull_all(broker.native, "orders")] == [SECRET]


def test_rotate_key_then_restart_seals_new_records_with_the_new_key_and_old_ones_stay_readable(tmp_path, key_file,
                                                                                           capsys):
    data = tmp_path / "data"
    with encrypted_broker(data, key_file) as broker, Producer(address=broker.native) as producer:
        producer.send("orders", b"sealed with k1")
    assert cli.main(["admin", "rotate-key", "--set", f"storage.encryption_key_file={key_file}"]) == 0
    assert "added key k2" in capsys.readouterr().err
    with encrypted_broker(data, key_file) as broker:
        with Producer(address=broker.native) as producer:
            producer.send("orders", b"sealed with k2")
        assert [m.body for m in pull_all(broker.native, "orders")] == [b"sealed with k1", b"sealed with k2"]
    uses = json.loads(StoreLayout(data).encryption_keys_path.read_text())["keys"]
    assert [u["id"] for u in uses] == ["k1", "k2"] and uses[1]["since"] > 0


def test_rotate_key_refuses_a_group_readable_key_file_and_needs_a_keyring(tmp_path, key_file, monkeypatch, capsys):
    key_file.chmod(0o644)
    result = subprocess.run([sys.executable, "-m", "tidegate.gateway", "admin", "rotate-key", "--key-file",
                             str(key_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "chmod 600" in result.stderr and "Traceback" not in result.stderr
    for name in [n for n in os.environ if n.startswith("TIDEGATE_")]:
        monkeypatch.delenv(name)
    assert cli.main(["admin", "rotate-key"]) == 2
    assert "no keyring configured" in capsys.readouterr().err
