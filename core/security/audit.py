"""The audit log: one JSON object per line, in a file rotated by size (`[audit] file`, `max_bytes`, `backup_count`).

Events (`"event"` field):
- `login`: every authentication, success or failure: user, source address, mechanism (password, token,
  anonymous, guest, ...), listener, client id, and for failures the reason;
- `denied`: an action the gate refused. Rate-limited per (user, action, resource type): the first denial of a key is
  written at once, later ones within `denial_interval_s` are counted and the next line written for that key carries
  `"repeats"` (denials since the previous line, itself included), so a client hammering a forbidden topic costs one
  line per interval, not one per message. The table of keys is bounded (oldest forgotten first);
- `admin`: every change made through the admin HTTP API (and so the CLI): who, from where, the operation, the
  target and its state before and after;
- `limit`: a request a limit against abuse refused (core/security/limits.py): listener, cause (the metric's label),
  user and source address when known, and the refusal's text. Rate-limited per (listener, cause) like denials;
- `tls_handshake_failed`: a TLS handshake that ended in a fatal alert (gateway/tls.py): listener, cause (the
  metric's label) and source address. Rate-limited per (listener, cause) like denials.

Never written: passwords, password hashes, tokens, message bodies or properties. Callers pass only names and states
(`User.to_dict()` has no hash); `AuditLog` drops any field named like a secret as a second line of defence.
With no file configured every call is a no-op. New files and rotated files are created 0600.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

SECRET_FIELDS = frozenset({"password", "password_hash", "token", "secret", "body", "payload", "properties"})
# (a field named like one of these is dropped wherever it appears, e.g. inside an admin change's "after")
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_BACKUP_COUNT = 5
DENIAL_INTERVAL_S = 60.0
MAX_DENIAL_KEYS = 10_000


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating handler whose files are created 0600 whatever the umask (the audit log names users and hosts)."""

    def _open(self) -> Any:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, "a", encoding=self.encoding or "utf-8", errors=self.errors)


def scrub(value: Any) -> Any:
    """`value` without any mapping field whose name says it holds a secret or a payload."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if str(k).lower() not in SECRET_FIELDS}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


class AuditLog:
    """Writes audit events to `path` (None: off). Calls run on the reactor thread; one line is one buffered write."""

    def __init__(self, path: str | os.PathLike[str] | None, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 backup_count: int = DEFAULT_BACKUP_COUNT, clock: Callable[[], float] = time.time,
                 denial_interval_s: float = DENIAL_INTERVAL_S, max_denial_keys: int = MAX_DENIAL_KEYS) -> None:
        self.path = os.fspath(path) if path else None
        self._clock = clock
        self.denial_interval_s = denial_interval_s
        self.max_denial_keys = max_denial_keys
        # (event, key...) -> [time of the last line written, events since then not yet written]
        self._throttled: OrderedDict[tuple[str, ...], list[float]] = OrderedDict()
        self._handler: logging.Handler | None = None
        if self.path is not None:
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, mode=0o700, exist_ok=True)
            self._handler = _PrivateRotatingFileHandler(self.path, maxBytes=max_bytes, backupCount=backup_count,
                                                        encoding="utf-8")
            self._handler.setFormatter(logging.Formatter("%(message)s"))

    @property
    def enabled(self) -> bool:
        return self._handler is not None

    def write(self, event: str, **fields: Any) -> None:
        """One line: `{"ts": <unix seconds>, "event": event, ...fields}` with secret-named fields removed."""
        if self._handler is None:
            return
        record = {"ts": round(self._clock(), 3), "event": event, **scrub(fields)}
        line = json.dumps(record, separators=(",", ":"), sort_keys=False, default=str)
        self._handler.emit(logging.LogRecord("tidegate.audit", logging.INFO, __file__, 0, line, None, None))

    def login(self, *, ok: bool, user: str, source: str, mechanism: str, listener: str, client_id: str = "",
              reason: str = "") -> None:
        if self._handler is None:
            return  # off (the default): a reconnect storm's logins build no record
        fields: dict[str, Any] = {"ok": ok, "user": user, "source": source, "mechanism": mechanism,
                                  "listener": listener}
        if client_id:
            fields["client_id"] = client_id
        if not ok:
            fields["reason"] = reason
        self.write("login", **fields)

    def _admit(self, key: tuple[str, ...]) -> int:
        """Rate limiting of repeated events: 0 when this one is only counted, else the `repeats` its line carries
        (itself plus those counted since the previous line of `key`)."""
        now = self._clock()
        state = self._throttled.get(key)
        if state is not None and now - state[0] < self.denial_interval_s:
            state[1] += 1
            self._throttled.move_to_end(key)
            return 0
        repeats = 1 + (int(state[1]) if state is not None else 0)
        self._throttled[key] = [now, 0]
        self._throttled.move_to_end(key)
        while len(self._throttled) > self.max_denial_keys:
            self._throttled.popitem(last=False)
        return repeats

    def denial(self, *, user: str, action: str, resource: str, source: str, listener: str, reason: str = "") -> None:
        if self._handler is None:
            return
        # resource type, not name: a bounded number of keys per user
        repeats = self._admit(("denied", user, action, resource.split(":", 1)[0]))
        if repeats:
            self.write("denied", user=user, action=action, resource=resource, source=source, listener=listener,
                       reason=reason, repeats=repeats)

    def limit_hit(self, *, listener: str, cause: str, user: str = "", source: str = "", reason: str = "") -> None:
        """A limit refused a request. One line per (listener, cause) and interval: a flood against a limit (the
        very thing limits are for) must not become a flood of audit lines."""
        if self._handler is None:
            return
        repeats = self._admit(("limit", listener, cause))
        if repeats:
            fields: dict[str, Any] = {"listener": listener, "cause": cause}
            if user:
                fields["user"] = user
            if source:
                fields["source"] = source
            self.write("limit", **fields, reason=reason, repeats=repeats)

    def tls_failure(self, *, listener: str, cause: str, source: str = "") -> None:
        """A TLS handshake failed (untrusted, expired or missing client certificate, no shared version or cipher)."""
        if self._handler is None:
            return
        repeats = self._admit(("tls_handshake_failed", listener, cause))
        if repeats:
            self.write("tls_handshake_failed", listener=listener, cause=cause, source=source, repeats=repeats)

    def admin_change(self, *, who: str, source: str, operation: str, target: str, before: Any, after: Any,
                     status: int) -> None:
        self.write("admin", who=who, source=source, operation=operation, target=target, before=before, after=after,
                   status=status)

    def flush_denials(self) -> None:
        """Write the counts of rate-limited events still waiting for their next line (at shutdown)."""
        if self._handler is None:
            return
        for key, (_, pending) in list(self._throttled.items()):
            if not pending:
                continue
            event = key[0]
            if event == "denied":
                _, user, action, resource_type = key
                self.write("denied", user=user, action=action, resource=f"{resource_type}:*", source="",
                           listener="", reason="summary at shutdown", repeats=int(pending))
            else:
                _, listener, cause = key
                self.write(event, listener=listener, cause=cause, reason="summary at shutdown", repeats=int(pending))
        self._throttled.clear()

    def close(self) -> None:
        if self._handler is not None:
            self.flush_denials()
            self._handler.close()
            self._handler = None
