"""Persistent MQTT sessions resuming after a broker restart (real file store and SQLite metadata, the gate
`tidegate serve` uses): queued QoS 1 messages are delivered, subscriptions are kept, and the metadata work of a
resume storm is batched: a constant number of SQL statements however many sessions resume in one turn."""

from __future__ import annotations

from tidegate.adapters.mqtt.packets import Connack, Puback, Publish
from tidegate.gateway.bench.mqtt_resume import ResumeRun


def resume_with_trace(run: ResumeRun, count: int) -> tuple[list, list[str], tuple]:
    """Reopen the broker on the run's data dir and resume `count` sessions in one turn; returns the connections,
    the SQL statements run meanwhile, and the open stack."""
    clock, broker, metadata, factory = run._open()
    clients = [run._client(index, clean=False) for index in range(count)]
    statements: list[str] = []
    metadata._conn.set_trace_callback(statements.append)
    connections = [run._connect(factory, client) for client in clients]
    clock.advance(0)
    metadata._conn.set_trace_callback(None)
    return connections, statements, (clock, broker, metadata, factory)


def test_resumed_sessions_get_their_queued_messages_and_keep_their_subscriptions(tmp_path) -> None:
    run = ResumeRun(str(tmp_path), 6, queued_every=2)
    run.prepare()
    connections, _, (clock, broker, metadata, factory) = resume_with_trace(run, 6)
    got: dict[int, list] = {}
    for index, (_protocol, transport, codec) in enumerate(connections):
        packets = codec.receive_data(transport.value())
        transport.clear()
        assert isinstance(packets[0], Connack) and packets[0].session_present
        got[index] = [p for p in packets[1:] if isinstance(p, Publish)]
    assert {i: [(p.topic, p.payload, p.qos) for p in ps] for i, ps in got.items()} == {
        0: [("bench/resume/0", b"queued", 1)], 1: [], 2: [("bench/resume/2", b"queued", 1)], 3: [],
        4: [("bench/resume/4", b"queued", 1)], 5: []}
    # the subscription stored before the restart still routes: a new publish reaches session 3
    publisher, out, pub_codec = run._connect(factory, run._client(99, clean=True))
    publisher.dataReceived(pub_codec.encode(Publish("bench/resume/3", b"after", 1, packet_id=1)))
    for _ in range(3):
        clock.advance(0)
    _protocol, transport, codec = connections[3]
    assert [(p.topic, p.payload) for p in codec.receive_data(transport.value())] == [("bench/resume/3", b"after")]
    # the first session acknowledges its queued message: it is not delivered again after another restart
    protocol, transport, codec = connections[0]
    protocol.dataReceived(codec.encode(Puback(got[0][0].packet_id)))
    clock.advance(0)
    for protocol, _, _ in connections:
        protocol.connectionLost(None)
    publisher.connectionLost(None)
    clock.advance(0)
    run._close(broker, metadata, factory)
    connections, _, (clock, broker, metadata, factory) = resume_with_trace(run, 3)
    redelivered = [[p.topic for p in codec.receive_data(transport.value()) if isinstance(p, Publish)]
                   for _, transport, codec in connections]
    assert redelivered == [[], [], ["bench/resume/2"]]
    run._close(broker, metadata, factory)


def test_a_resume_storm_runs_a_constant_number_of_sql_statements(tmp_path) -> None:
    """Session rows are committed in one transaction per turn, offsets and group rows are read in bulk: no SQL
    statement is run per resumed session except its row's upsert inside the one transaction."""
    counts = {}
    for count in (5, 40):
        run = ResumeRun(str(tmp_path / str(count)), count, queued_every=0)
        run.prepare()
        connections, statements, (_clock, broker, metadata, factory) = resume_with_trace(run, count)
        assert all(isinstance(codec.receive_data(transport.value())[0], Connack)
                   for _, transport, codec in connections)
        upserts = [s for s in statements if s.startswith("INSERT INTO kv")]
        assert len(upserts) == count  # one row per session (executemany), in the one transaction below
        others = [s for s in statements if not s.startswith("INSERT INTO kv")]
        assert others.count("BEGIN") == 1 and others.count("COMMIT") == 1
        counts[count] = len(others)
        run._close(broker, metadata, factory)
    assert counts[5] == counts[40], counts
