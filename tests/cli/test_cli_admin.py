"""Operator commands (topic, send, consume, group, message) against a real `tidegate serve`."""

from __future__ import annotations

import io
import json
import socket
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tidegate.gateway.cli_admin import body_view, parse_time_ms


def as_json(out: str) -> object:
    return json.loads(out)


def json_lines(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_topic_create_then_list_shows_the_topic_with_its_queues_and_permission(tidegate, server, topic_name) -> None:
    code, out, err = tidegate("topic", "create", topic_name, "--queues", "3", "--perm", "rw")
    assert (code, err) == (0, "")
    assert f"created topic {topic_name} with 3 queues" in out
    code, out, _ = tidegate("topic", "list", "--json")
    assert code == 0
    listed = {t["name"]: t for t in as_json(out)}
    assert listed[topic_name]["queues"] == 3
    assert listed[topic_name]["perm"] == "rw"
    code, out, _ = tidegate("topic", "list")
    assert code == 0 and out.startswith("TOPIC") and topic_name in out


def test_creating_an_existing_topic_fails_with_one_error_line_naming_the_code(tidegate, server, topic_name) -> None:
    assert tidegate("topic", "create", topic_name)[0] == 0
    code, out, err = tidegate("topic", "create", topic_name)
    assert code == 1
    assert out == ""
    assert err == f"error: topic {topic_name!r} already exists (TOPIC_EXISTS)\n"


def test_topic_update_changes_queue_count_and_permission(tidegate, server, topic_name) -> None:
    tidegate("topic", "create", topic_name, "--queues", "2")
    code, out, _ = tidegate("topic", "update", topic_name, "--queues", "5", "--perm", "r", "--json")
    assert code == 0
    assert as_json(out)["queues"] == 5 and as_json(out)["perm"] == "r"


def test_topic_update_without_a_change_is_a_usage_error(tidegate, server, topic_name) -> None:
    code, _, err = tidegate("topic", "update", topic_name)
    assert code == 2
    assert "nothing to change" in err


def test_topic_describe_reports_min_and_max_offset_per_queue(tidegate, server, topic_name) -> None:
    tidegate("topic", "create", topic_name, "--queues", "2")
    tidegate("send", topic_name, "m", "--count", "3")
    code, out, _ = tidegate("topic", "describe", topic_name, "--json")
    assert code == 0
    queues = as_json(out)["queue_offsets"]
    assert [q["queue_id"] for q in queues] == [0, 1]
    assert sum(q["max_offset"] - q["min_offset"] for q in queues) == 3
    code, out, _ = tidegate("topic", "describe", topic_name)
    assert "MIN OFFSET" in out and "MAX OFFSET" in out


def test_topic_delete_removes_the_topic(tidegate, server, topic_name) -> None:
    tidegate("topic", "create", topic_name)
    code, out, _ = tidegate("topic", "delete", topic_name)
    assert code == 0 and f"deleted topic {topic_name}" in out
    code, _, err = tidegate("topic", "describe", topic_name)
    assert code == 1
    assert err.endswith("(TOPIC_NOT_FOUND)\n") and err.count("\n") == 1


def test_send_prints_id_queue_and_offset_of_every_copy(tidegate, server, topic_name) -> None:
    tidegate("topic", "create", topic_name, "--queues", "1")
    code, out, _ = tidegate("send", topic_name, "hello", "--count", "3", "--json")
    assert code == 0
    sent = as_json(out)
    assert [s["queue_offset"] for s in sent] == [0, 1, 2]
    assert all(s["queue_id"] == 0 and s["topic"] == topic_name and len(s["msg_id"]) == 24 for s in sent)
    code, out, _ = tidegate("send", topic_name, "again")
    assert out.splitlines()[0].split() == ["MSG", "ID", "QUEUE", "OFFSET"]
    assert out.splitlines()[1].split()[1:] == [f"{topic_name}:0", "3"]


def test_consume_prints_offset_id_tag_keys_properties_and_text_body(tidegate, server, topic_name) -> None:
    tidegate("topic", "create", topic_name, "--queues", "1")
    code, out, _ = tidegate("send", topic_name, "hello world", "--tag", "TagA", "--key", "k1", "--key", "k2",
                            "--prop", "color=blue", "--subject", "eu/de", "--json")
    msg_id = as_json(out)[0]["msg_id"]
    code, out, err = tidegate("consume", topic_name, "--group", "g-print", "--from", "earliest", "--count", "1")
    assert code == 0
    assert out == (f"queue={topic_name}:0 offset=0 id={msg_id} subject=eu/de tag=TagA keys=k1,k2 "
                   'props={"color": "blue"} body="hello world"\n')
    assert "consumed 1 message(s)" in err


def test_send_reads_a_binary_body_from_a_file_and_consume_shows_it_as_hex(tidegate, server, topic_name,
                                                                           tmp_path: Path) -> None:
    body_file = tmp_path / "body.bin"
    body_file.write_bytes(b"\x00\x01\xfe\xff")
    assert tidegate("send", topic_name, "--file", str(body_file))[0] == 0
    code, out, _ = tidegate("consume", topic_name, "--group", "g-hex", "--from", "earliest", "--count", "1", "--json")
    record = json_lines(out)[0]
    assert (record["body_encoding"], record["body"], record["body_size"]) == ("hex", "0001feff", 4)


def test_send_reads_the_body_from_stdin_when_none_is_given(tidegate, server, topic_name,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    class PipedStdin(io.TextIOWrapper):
        def isatty(self) -> bool:
            return False

    monkeypatch.setattr("sys.stdin", PipedStdin(io.BytesIO(b"from a pipe\n")))
    assert tidegate("send", topic_name)[0] == 0
    code, out, _ = tidegate("consume", topic_name, "--group", "g-stdin", "--from", "earliest", "--count", "1", "--json")
    assert json_lines(out)[0]["body"] == "from a pipe\n"


def test_consume_with_count_commits_only_the_messages_it_printed(tidegate, server, topic_name) -> None:
    tidegate("topic", "create", topic_name, "--queues", "1")
    tidegate("send", topic_name, "m", "--count", "5")
    code, out, _ = tidegate("consume", topic_name, "--group", "g-count", "--from", "earliest", "--count", "2", "--json")
    assert [r["queue_offset"] for r in json_lines(out)] == [0, 1]
    code, out, _ = tidegate("group", "describe", "g-count", "--json")
    assert [(p["committed"], p["lag"]) for p in as_json(out)["progress"]] == [(2, 3)]
    code, out, _ = tidegate("consume", topic_name, "--group", "g-count", "--count", "3", "--json")
    assert [r["queue_offset"] for r in json_lines(out)] == [2, 3, 4]


def test_consume_filter_delivers_only_matching_tags(tidegate, server, topic_name) -> None:
    for tag in ("A", "B", "A", "C"):
        tidegate("send", topic_name, tag, "--tag", tag)
    code, out, _ = tidegate("consume", topic_name, "--group", "g-filter", "--from", "earliest", "--filter", "A || C",
                            "--timeout", "1", "--json")
    assert code == 0
    assert sorted(r["tag"] for r in json_lines(out)) == ["A", "A", "C"]


def test_consume_in_message_ack_mode_acks_what_it_printed(tidegate, server, topic_name) -> None:
    tidegate("topic", "create", topic_name, "--queues", "1")
    tidegate("send", topic_name, "m", "--count", "3")
    code, out, _ = tidegate("consume", topic_name, "--group", "g-ack", "--from", "earliest", "--ack", "message",
                            "--count", "2", "--json")
    assert [r["queue_offset"] for r in json_lines(out)] == [0, 1]
    code, out, _ = tidegate("consume", topic_name, "--group", "g-ack", "--ack", "message", "--timeout", "1", "--json")
    assert [r["queue_offset"] for r in json_lines(out)] == [2]


def test_consume_timeout_ends_a_consume_that_gets_nothing(tidegate, server, topic_name) -> None:
    code, out, err = tidegate("consume", topic_name, "--group", "g-idle", "--timeout", "0.5")
    assert (code, out) == (0, "")
    assert "consumed 0 message(s)" in err


def test_group_list_and_describe_show_lag_per_queue(tidegate, server, topic_name) -> None:
    tidegate("topic", "create", topic_name, "--queues", "2")
    tidegate("consume", topic_name, "--group", "g-lag", "--from", "latest", "--timeout", "0.2")
    tidegate("send", topic_name, "m", "--count", "4")
    code, out, _ = tidegate("group", "describe", "g-lag", "--json")
    assert code == 0
    described = as_json(out)
    assert described["lag"] == 4 and described["topics"] == [topic_name]
    assert sorted(p["queue_id"] for p in described["progress"]) == [0, 1]
    assert sum(p["lag"] for p in described["progress"]) == 4
    code, out, _ = tidegate("group", "list", "--json")
    assert {g["name"]: g["lag"] for g in as_json(out)}["g-lag"] == 4
    code, out, _ = tidegate("group", "list")
    assert out.startswith("GROUP") and "g-lag" in out


def test_group_describe_of_an_unknown_group_reports_group_not_found(tidegate, server) -> None:
    code, _, err = tidegate("group", "describe", "no-such-group-here")
    assert code == 1 and err.endswith("(GROUP_NOT_FOUND)\n")


def test_group_reset_offset_to_earliest_replays_the_topic(tidegate, server, topic_name) -> None:
    tidegate("topic", "create", topic_name, "--queues", "1")
    tidegate("send", topic_name, "m", "--count", "2")
    tidegate("consume", topic_name, "--group", "g-reset", "--from", "earliest", "--count", "2")
    code, out, _ = tidegate("group", "reset-offset", "g-reset", "--topic", topic_name, "--to", "earliest", "--json")
    assert code == 0
    assert as_json(out)["offsets"] == [{"topic": topic_name, "queue_id": 0, "offset": 0}]
    code, out, _ = tidegate("consume", topic_name, "--group", "g-reset", "--count", "2", "--json")
    assert [r["queue_offset"] for r in json_lines(out)] == [0, 1]


def test_group_reset_offset_to_a_time_starts_at_the_first_message_stored_after_it(tidegate, server,
                                                                                   topic_name) -> None:
    tidegate("topic", "create", topic_name, "--queues", "1")
    tidegate("send", topic_name, "old")
    tidegate("consume", topic_name, "--group", "g-time", "--from", "earliest", "--count", "1")
    _, out, _ = tidegate("send", topic_name, "new", "--json")
    _, out, _ = tidegate("message", "query", "--id", as_json(out)[0]["msg_id"], "--json")
    stored = as_json(out)[0]["store_ts"]
    iso = datetime.fromtimestamp(stored / 1000, tz=UTC).isoformat(timespec="milliseconds")
    code, out, _ = tidegate("group", "reset-offset", "g-time", "--topic", topic_name, "--to", iso, "--json")
    assert code == 0
    assert as_json(out)["offsets"][0]["offset"] == 1


def test_message_query_finds_messages_by_id_by_key_and_by_store_time(tidegate, server, topic_name) -> None:
    _, out, _ = tidegate("send", topic_name, "keyed", "--key", "order-42", "--json")
    msg_id = as_json(out)[0]["msg_id"]
    code, out, _ = tidegate("message", "query", "--id", msg_id, "--json")
    assert code == 0 and as_json(out)[0]["body"] == "keyed"
    code, out, _ = tidegate("message", "query", "--key", "order-42", "--topic", topic_name, "--json")
    assert [m["msg_id"] for m in as_json(out)] == [msg_id]
    code, out, _ = tidegate("message", "query", "--topic", topic_name, "--from", "0", "--json")
    assert [m["msg_id"] for m in as_json(out)] == [msg_id]
    code, out, _ = tidegate("message", "query", "--id", msg_id)
    assert f"id={msg_id}" in out and 'body="keyed"' in out


@pytest.mark.parametrize("argv", [
    ("message", "query"),
    ("message", "query", "--key", "k"),
    ("message", "query", "--topic", "t"),
    ("message", "query", "--id", "x", "--topic", "t"),
])
def test_message_query_with_an_incomplete_selection_is_a_usage_error(tidegate, server, argv) -> None:
    code, out, err = tidegate(*argv)
    assert code == 2 and out == ""
    assert err.startswith("tidegate message: error:") and err.count("\n") == 1


def test_bad_arguments_exit_2_with_one_line(tidegate, server) -> None:
    code, _, err = tidegate("topic", "create", "x", "--queues", "0")
    assert code == 2 and err.count("\n") == 1
    code, _, err = tidegate("consume", "t")  # --group is required
    assert code == 2 and "--group" in err


def test_an_unreachable_broker_is_one_clear_line_not_a_traceback(tidegate, monkeypatch) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]  # nothing listens once the probe closes
    monkeypatch.delenv("TIDEGATE_SERVER", raising=False)
    code, out, err = tidegate("topic", "list", "--server", f"127.0.0.1:{closed_port}")
    assert code == 1 and out == ""
    assert err.startswith(f"error: cannot connect to the broker at 127.0.0.1:{closed_port}: connection refused")
    assert "Traceback" not in err and err.count("\n") == 1


def test_server_option_wins_over_the_environment(tidegate, server, monkeypatch) -> None:
    monkeypatch.setenv("TIDEGATE_SERVER", "127.0.0.1:1")
    code, _, _ = tidegate("topic", "list", "--server", server)
    assert code == 0


def test_parse_time_accepts_milliseconds_and_iso_8601_with_or_without_offset() -> None:
    assert parse_time_ms("1700000000000") == 1_700_000_000_000
    assert parse_time_ms("2023-11-14T22:13:20Z") == 1_700_000_000_000
    assert parse_time_ms("2023-11-14T23:13:20+01:00") == 1_700_000_000_000
    local = datetime(2023, 11, 14, 22, 13, 20).astimezone()
    assert parse_time_ms("2023-11-14T22:13:20") == int(local.timestamp() * 1000)


def test_body_view_shows_printable_text_as_text_and_anything_else_as_hex() -> None:
    assert body_view("héllo\n\ttab".encode()) == ("utf-8", "héllo\n\ttab")
    assert body_view(b"\x1b[31mred") == ("hex", b"\x1b[31mred".hex())
    assert body_view(b"\xff\xfe") == ("hex", "fffe")
