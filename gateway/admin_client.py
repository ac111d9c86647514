"""The CLI's client of the broker's admin HTTP API, shared by every command that calls it (`tidegate user|role|acl`,
`tidegate user limits`, `tidegate topic schema`, `tidegate admin tls-reload`).

Where: `--admin [https://]HOST:PORT`, else `$TIDEGATE_ADMIN_URL`, else `$TIDEGATE_ADMIN`, else 127.0.0.1:8080; an
address without a scheme is plain http. An https:// address is verified (certificate chain and host name, the
standard library's defaults) against `--cafile`, else `$TIDEGATE_ADMIN_CAFILE`, else the system trust store.
Who: `TIDEGATE_USER` and `TIDEGATE_PASSWORD`, or `--admin-user` and a password prompt, sent as HTTP Basic.
"""

from __future__ import annotations

import argparse
import base64
import functools
import getpass
import http.client
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from tidegate.gateway.cli import EXIT_FAILURE, UsageError

ADMIN_ENV = "TIDEGATE_ADMIN"
ADMIN_URL_ENV = "TIDEGATE_ADMIN_URL"
ADMIN_CAFILE_ENV = "TIDEGATE_ADMIN_CAFILE"
USER_ENV = "TIDEGATE_USER"
PASSWORD_ENV = "TIDEGATE_PASSWORD"
DEFAULT_ADMIN = "127.0.0.1:8080"
TIMEOUT_S = 30.0

Handler = Callable[[argparse.Namespace], int]


class ApiError(Exception):
    """The admin API answered with an HTTP error; the message is its `error` field."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def admin_options() -> argparse.ArgumentParser:
    """--admin, --cafile, --admin-user and --json: a parent parser for every command that calls the admin API."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--admin", metavar="[https://]HOST:PORT", default=None,
                        help=f"broker admin address (default: ${ADMIN_URL_ENV}, ${ADMIN_ENV} or {DEFAULT_ADMIN}); "
                             "https:// for a TLS admin port")
    common.add_argument("--cafile", default=None,
                        help=f"CA bundle that signs an https:// admin certificate (default: ${ADMIN_CAFILE_ENV}, "
                             "else the system trust store)")
    common.add_argument("--admin-user", default=None,
                        help=f"administrator to act as (default: ${USER_ENV}; password from ${PASSWORD_ENV} "
                             "or a prompt)")
    common.add_argument("--json", action="store_true", help="print JSON")
    return common


def admin_address(args: argparse.Namespace) -> str:
    return (getattr(args, "admin", None) or os.environ.get(ADMIN_URL_ENV) or os.environ.get(ADMIN_ENV)
            or DEFAULT_ADMIN)


def base_url(address: str) -> str:
    """`address` as a URL without a trailing slash: http:// unless it names a scheme."""
    url = address if address.startswith(("http://", "https://")) else f"http://{address}"
    return url.rstrip("/")


class AdminClient:
    """JSON over HTTP(S) Basic to /api/<section>/ (security, topics, tls) on the broker's admin port."""

    def __init__(self, address: str, user: str, password: str, section: str = "security", *,
                 cafile: str | None = None) -> None:
        url = base_url(address)
        self.base = f"{url}/api/{section}/"
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        self.headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}
        # https: the chain and the host name are checked (never switched off); cafile adds a private CA
        self.context = None
        if url.startswith("https://"):
            try:
                self.context = ssl.create_default_context(cafile=cafile or None)
            except (OSError, ValueError) as exc:  # missing file, or no certificate in it
                raise UsageError(f"--cafile {cafile}: {exc}") from None

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S,  # noqa: S310 (our broker's admin API)
                                        context=self.context) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except (ValueError, AttributeError):
                message = exc.reason
            raise ApiError(exc.code, str(message)) from None


def client_for(args: argparse.Namespace, section: str = "security") -> AdminClient:
    """The client for the command's arguments and environment (prompting for a password if needed)."""
    user = getattr(args, "admin_user", None) or os.environ.get(USER_ENV)
    if not user:
        raise UsageError(f"who is the administrator? set ${USER_ENV} and ${PASSWORD_ENV}, or pass --admin-user")
    password = os.environ.get(PASSWORD_ENV) if not getattr(args, "admin_user", None) else None
    if password is None:
        password = getpass.getpass(f"password for {user}: ")
    cafile = getattr(args, "cafile", None) or os.environ.get(ADMIN_CAFILE_ENV) or None
    return AdminClient(admin_address(args), user, password, section, cafile=cafile)


def guarded(handler: Handler) -> Handler:
    """API errors and an unreachable (or unverifiable) broker become one stderr line and exit code 1."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except ApiError as exc:
            print(f"error: {exc} (HTTP {exc.status})", file=sys.stderr)
        except urllib.error.URLError as exc:
            print(f"error: cannot reach the broker's admin API at {admin_address(args)}: {exc.reason} "
                  f"(point --admin or ${ADMIN_URL_ENV} at it; --cafile for an https:// port)", file=sys.stderr)
        except (TimeoutError, OSError) as exc:
            print(f"error: cannot reach the broker's admin API at {admin_address(args)}: {exc}", file=sys.stderr)
        except (ValueError, http.client.InvalidURL) as exc:  # a malformed --admin address, before any I/O
            raise UsageError(f"--admin {admin_address(args)}: {exc}") from None
        return EXIT_FAILURE

    return run
