"""Session rows: made once per write-behind flush however often the session changed in the turn, and the stored
subscriptions' part reused until the subscriptions change (a resume rewrites the row, never its subscriptions)."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock

from tidegate.adapters.mqtt.sessions import Session, SessionManager, SubscriptionEntry
from tidegate.adapters.mqtt.settings import MqttSettings
from tidegate.core.security import AllowAllGate
from tidegate.core.session import system_session
from tidegate.core.testing import make_broker


class Rows:
    """An adapter state namespace that records every `apply`."""

    def __init__(self) -> None:
        self.data: dict = {}
        self.applied: list[dict] = []

    def items(self):
        return list(self.data.items())

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        self.data[key] = value

    def delete(self, key):
        self.data.pop(key, None)

    def apply(self, changes):
        self.applied.append(changes)
        for key, value in changes.items():
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = value


def manager() -> tuple[SessionManager, Rows, MemoryReactorClock]:
    clock = MemoryReactorClock()
    broker = make_broker(clock)
    rows = Rows()
    system = system_session(broker, AllowAllGate(), "mqtt")
    return SessionManager(system, clock, MqttSettings(), lambda *_: None, rows=rows, share_rows=Rows()), rows, clock


def test_a_session_saved_many_times_in_one_turn_gets_one_row_with_its_newest_state(monkeypatch) -> None:
    sessions, rows, clock = manager()
    session = Session("c1", "%MQTT%c1", 4, 3600, persisted=True)
    made = []
    to_row = Session.to_row
    monkeypatch.setattr(Session, "to_row", lambda self: made.append(self.client_id) or to_row(self))
    for at in (1, 2, 3):
        session.disconnected_at = at
        sessions.save(session)
    assert made == [] and rows.applied == []  # written behind
    clock.advance(0)
    assert made == ["c1"] and len(rows.applied) == 1
    assert rows.data["c1"]["disconnected_at"] == 3


def test_stored_subscriptions_are_reused_until_a_subscription_changes() -> None:
    stored = Session("c1", "%MQTT%c1", 4, 3600)
    stored.put_subscription(SubscriptionEntry("a/+", 1))
    stored.put_subscription(SubscriptionEntry("$share/g/b", 0, share=("g", "b")))
    row = stored.to_row()
    restored = Session.from_row(row)
    assert restored.subs_row is row["subs"] and restored.to_row() == row
    restored.put_subscription(SubscriptionEntry("c", 2))
    assert [s[0] for s in restored.to_row()["subs"]] == ["a/+", "$share/g/b", "c"]
    restored.pop_subscription("a/+")
    assert [s[0] for s in restored.to_row()["subs"]] == ["$share/g/b", "c"]
    restored.clear_subscriptions()
    assert restored.to_row()["subs"] == []
    assert Session.from_row(row).to_row() == row  # the same row read again: written back unchanged
