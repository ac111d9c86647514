"""Security commands of the `tidegate` CLI: `user`, `role` and `acl`.

They call the running broker's admin HTTP API (/api/security, gateway/admin.py) rather than editing meta.db: the
broker holds the database open and answers from memory, so only the broker may change it (and bump the gate's
version so live connections re-decide). The CLI authenticates as an administrator with `TIDEGATE_USER` and
`TIDEGATE_PASSWORD` (or `--admin-user`, then a password prompt); `--user` names the subject of `acl` and `role`
commands, as in `tidegate acl grant --user alice --allow Pub --resource 'Topic:telemetry/${username}/#'`.

    echo -n s3cret | tidegate user add alice --password-stdin
    tidegate user passwd|disable|enable|delete alice;  tidegate user list [--json]
    tidegate role add|delete devices;  tidegate role list;  tidegate role assign|unassign devices --user alice
    tidegate acl grant|revoke (--user U | --role R) (--allow A,.. | --deny A,..) --resource R [--source CIDR]...
    tidegate acl revoke (--user U | --role R) --id N
    tidegate acl list [--user U | --role R] [--json]
    tidegate acl check --user U --action A --resource R [--source IP] [--client-id C] [--json]
    tidegate user limits [NAME] [--publish-rate N] [--bandwidth BYTES] [--max-connections N] ... [--unset F] [--clear]
    tidegate topic schema set TOPIC --file schema.json [--content-type application/json]
    tidegate topic schema show|clear TOPIC;  tidegate topic schema list

The admin port may be plain http or https (`--admin https://host:8443 --cafile ca.pem`, or `TIDEGATE_ADMIN_URL` and
`TIDEGATE_ADMIN_CAFILE`): gateway/admin_client.py, shared with `tidegate admin tls-reload`.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import json
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tidegate.gateway.admin_client import admin_options, client_for, guarded
from tidegate.gateway.cli import EXIT_OK, UsageError

# ----------------------------------------------------------------------------------------------- registration
# `tidegate user limits` options: flag -> per-user limit field (core/security/limits.py USER_SETTING_NAMES)
LIMIT_FLAGS = {
    "--publish-rate": ("publish_rate", "messages per second over all the user's connections"),
    "--publish-burst": ("publish_burst", "messages allowed at once above the rate (default: the rate)"),
    "--bandwidth": ("publish_bytes_rate", "published body bytes per second"),
    "--bandwidth-burst": ("publish_bytes_burst", "bytes allowed at once above the rate (default: the rate)"),
    "--max-connections": ("max_connections_per_user", "connections at once, every protocol together"),
    "--max-subscriptions": ("max_subscriptions_per_session", "subscriptions of one connection"),
    "--max-message-bytes": ("max_message_bytes", "body bytes of one message"),
    "--max-property-bytes": ("max_property_bytes", "property bytes of one message"),
    "--max-topics-created": ("max_topics_created_per_user", "topics the user may have created (that still exist)"),
}


def register(commands: argparse._SubParsersAction) -> None:
    common = admin_options()

    user = commands.add_parser("user", help="add, list, disable and delete users")
    sub = user.add_subparsers(dest="user_command", metavar="{add,passwd,disable,enable,delete,list,limits}",
                              required=True)
    add = sub.add_parser("add", parents=[common], help="create a user")
    add.add_argument("name")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    add.add_argument("--role", action="append", default=[], help="a role to assign (repeatable)")
    add.set_defaults(handler=guarded(run_user_add))
    passwd = sub.add_parser("passwd", parents=[common], help="set a user's password")
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    passwd.set_defaults(handler=guarded(run_user_passwd))
    for verb in ("disable", "enable", "delete"):
        command = sub.add_parser(verb, parents=[common], help=f"{verb} a user")
        command.add_argument("name")
        command.set_defaults(handler=guarded(functools.partial(run_user_simple, verb)))
    listing = sub.add_parser("list", parents=[common], help="list users")
    listing.set_defaults(handler=guarded(run_user_list))
    limits = sub.add_parser("limits", parents=[common], help="show or set a user's limits (0 = unlimited); "
                            "without a name: the defaults and every user's overrides")
    limits.add_argument("name", nargs="?")
    for flag, (field, text) in LIMIT_FLAGS.items():
        limits.add_argument(flag, dest=field, type=int, default=None, metavar="N", help=text)
    limits.add_argument("--unset", action="append", default=[], metavar="FIELD",
                        help="remove one override (e.g. publish_rate): the [limits] default applies again")
    limits.add_argument("--clear", action="store_true", help="remove every override of the user")
    limits.set_defaults(handler=guarded(run_user_limits))

    role = commands.add_parser("role", help="add, list, assign and delete roles")
    sub = role.add_subparsers(dest="role_command", metavar="{add,delete,list,assign,unassign}", required=True)
    for verb in ("add", "delete"):
        command = sub.add_parser(verb, parents=[common], help=f"{verb} a role")
        command.add_argument("name")
        command.set_defaults(handler=guarded(functools.partial(run_role_simple, verb)))
    listing = sub.add_parser("list", parents=[common], help="list roles")
    listing.set_defaults(handler=guarded(run_role_list))
    for verb in ("assign", "unassign"):
        command = sub.add_parser(verb, parents=[common], help=f"{verb} a role to a user")
        command.add_argument("name", help="the role")
        command.add_argument("--user", required=True)
        command.set_defaults(handler=guarded(functools.partial(run_role_assign, verb)))

    acl = commands.add_parser("acl", help="grant, revoke, list and check policy entries")
    sub = acl.add_subparsers(dest="acl_command", metavar="{grant,revoke,list,check}", required=True)
    for verb in ("grant", "revoke"):
        command = sub.add_parser(verb, parents=[common], help=f"{verb} a policy entry")
        _owner_options(command, required=True)
        effect = command.add_mutually_exclusive_group()
        effect.add_argument("--allow", metavar="ACTIONS", help="Pub,Sub,Create,Update,Delete,Get,List or All")
        effect.add_argument("--deny", metavar="ACTIONS")
        command.add_argument("--resource", help="Topic:<pattern>, Group:<pattern> or Cluster:*")
        command.add_argument("--source", action="append", default=[], metavar="CIDR",
                             help="only from these addresses (repeatable)")
        if verb == "revoke":
            command.add_argument("--id", type=int, help="revoke the entry with this id (see acl list)")
        command.set_defaults(handler=guarded(functools.partial(run_acl_change, verb)))
    listing = sub.add_parser("list", parents=[common], help="list policy entries")
    _owner_options(listing, required=False)
    listing.set_defaults(handler=guarded(run_acl_list))
    check = sub.add_parser("check", parents=[common], help="what the gate decides for a user, action and resource")
    check.add_argument("--user", required=True)
    check.add_argument("--action", required=True)
    check.add_argument("--resource", required=True)
    check.add_argument("--source", default="", help="the client's address")
    check.add_argument("--client-id", default="", help="the client id (for ${client_id})")
    check.set_defaults(handler=guarded(run_acl_check))


def _owner_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    owner = parser.add_mutually_exclusive_group(required=required)
    owner.add_argument("--user", help="the user the entry belongs to")
    owner.add_argument("--role", help="the role the entry belongs to")


def _owner(args: argparse.Namespace) -> str | None:
    if args.user:
        return f"user:{args.user}"
    if args.role:
        return f"role:{args.role}"
    return None


# ----------------------------------------------------------------------------------------------- transport


def read_password(args: argparse.Namespace, stdin: Any = None) -> str:
    if args.password_stdin:
        password = (stdin or sys.stdin).read()
        password = password[:-1] if password.endswith("\n") else password  # `echo` without -n
    else:
        password = getpass.getpass(f"new password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise UsageError("the passwords differ")
    if not password:
        raise UsageError("the password is empty")
    return password


def emit(args: argparse.Namespace, value: Any, text: str) -> int:
    print(json.dumps(value) if args.json else text)
    return EXIT_OK


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


# ----------------------------------------------------------------------------------------------- handlers
def run_user_add(args: argparse.Namespace) -> int:
    password = read_password(args)
    user = client_for(args).call("POST", "users", {"name": args.name, "password": password, "roles": args.role})
    return emit(args, user, f"user {args.name} added")


def run_user_passwd(args: argparse.Namespace) -> int:
    password = read_password(args)
    user = client_for(args).call("POST", f"users/{_quote(args.name)}/password", {"password": password})
    return emit(args, user, f"password of {args.name} changed")


def run_user_simple(verb: str, args: argparse.Namespace) -> int:
    client = client_for(args)
    if verb == "delete":
        result = client.call("DELETE", f"users/{_quote(args.name)}")
    else:
        result = client.call("POST", f"users/{_quote(args.name)}/{verb}", {})
    return emit(args, result, f"user {args.name} {verb}d")


def run_user_list(args: argparse.Namespace) -> int:
    users = client_for(args).call("GET", "users")
    rows = [(u["name"], "yes" if u["enabled"] else "no", ",".join(u["roles"]) or "-") for u in users]
    return emit(args, users, table(("USER", "ENABLED", "ROLES"), rows))


def run_role_simple(verb: str, args: argparse.Namespace) -> int:
    client = client_for(args)
    if verb == "add":
        result = client.call("POST", "roles", {"name": args.name})
    else:
        result = client.call("DELETE", f"roles/{_quote(args.name)}")
    return emit(args, result, f"role {args.name} {verb}{'ed' if verb == 'add' else 'd'}")


def run_role_list(args: argparse.Namespace) -> int:
    roles = client_for(args).call("GET", "roles")
    return emit(args, roles, "\n".join(roles))


def run_role_assign(verb: str, args: argparse.Namespace) -> int:
    user = client_for(args).call("POST", f"roles/{_quote(args.name)}/{verb}", {"user": args.user})
    return emit(args, user, f"role {args.name} {verb}ed {'to' if verb == 'assign' else 'from'} {args.user}")


def run_acl_change(verb: str, args: argparse.Namespace) -> int:
    owner = _owner(args)
    if verb == "revoke" and args.id is not None:
        body: dict[str, Any] = {"owner": owner, "id": args.id}
    else:
        if not (args.allow or args.deny) or not args.resource:
            raise UsageError(f"acl {verb} needs --allow or --deny ACTIONS and --resource (or --id for revoke)")
        body = {"owner": owner, "resource": args.resource, "actions": (args.allow or args.deny).split(","),
                "decision": "Allow" if args.allow else "Deny", "sources": args.source}
    client = client_for(args)
    if verb == "grant":
        entry = client.call("POST", "policies", body)
        return emit(args, entry, f"granted #{entry['id']}: {entry['decision']} {','.join(entry['actions'])} "
                                 f"{entry['resource']} to {owner}")
    result = client.call("POST", "policies/revoke", body)
    return emit(args, result, f"revoked {', '.join(f'#{i}' for i in result['revoked'])} from {owner}")


def run_acl_list(args: argparse.Namespace) -> int:
    owner = _owner(args)
    path = "policies" + (f"?owner={urllib.parse.quote(owner)}" if owner else "")
    entries = client_for(args).call("GET", path)
    rows = [(e["id"], e["owner"], e["decision"], ",".join(e["actions"]), e["resource"], ",".join(e["sources"]) or "-")
            for e in entries]
    return emit(args, entries, table(("ID", "OWNER", "DECISION", "ACTIONS", "RESOURCE", "SOURCES"), rows))


def run_acl_check(args: argparse.Namespace) -> int:
    result = client_for(args).call("POST", "check", {"user": args.user, "action": args.action,
                                                    "resource": args.resource, "source": args.source,
                                                    "client_id": args.client_id})
    entry = result.get("entry")
    because = f" by {entry['owner']}: {entry['decision']} {entry['resource']}" if entry else f" ({result['reason']})"
    return emit(args, result, f"{result['decision']}{because}")


def run_user_limits(args: argparse.Namespace) -> int:
    client = client_for(args)
    changes: dict[str, Any] = {field: getattr(args, field) for field, _ in LIMIT_FLAGS.values()
                               if getattr(args, field) is not None}
    for field in args.unset:
        changes[field] = None
    if args.name is None:
        if changes or args.clear:
            raise UsageError("name the user whose limits to change")
        result = client.call("GET", "limits")
        rows = [(name, ", ".join(f"{k}={v}" for k, v in sorted(values.items()))) for name, values in
                result["users"].items()]
        defaults = ", ".join(f"{k}={v}" for k, v in result["defaults"].items() if v) or "none (all unlimited)"
        return emit(args, result, f"defaults: {defaults}\n" + table(("USER", "OVERRIDES"), rows))
    path = f"users/{_quote(args.name)}/limits"
    if args.clear:
        client.call("DELETE", path)
    if changes:
        result = client.call("POST", path, changes)
    else:
        result = client.call("GET", path)
    overrides = ", ".join(f"{k}={v}" for k, v in sorted(result["limits"].items())) or "none (the defaults apply)"
    return emit(args, result, f"limits of {args.name}: {overrides}")


# ----------------------------------------------------------------------------------------------- topic schemas
def register_topic_schema(topic_commands: argparse._SubParsersAction) -> None:
    """`tidegate topic schema set|show|clear|list` (called by gateway/cli_admin.py's `topic` parser)."""
    common = admin_options()
    schema = topic_commands.add_parser("schema", help="a topic's JSON Schema and content-type rule")
    sub = schema.add_subparsers(dest="schema_command", metavar="{set,show,clear,list}", required=True)
    setting = sub.add_parser("set", parents=[common], help="refuse messages that fail a JSON Schema and/or carry "
                             "another content type")
    setting.add_argument("topic")
    setting.add_argument("--file", help="the JSON Schema ('-' = standard input)")
    setting.add_argument("--content-type", default="", help="e.g. application/json")
    setting.set_defaults(handler=guarded(run_schema_set))
    for verb, text in (("show", "show a topic's rule"), ("clear", "remove a topic's rule")):
        command = sub.add_parser(verb, parents=[common], help=text)
        command.add_argument("topic")
        command.set_defaults(handler=guarded(functools.partial(run_schema_simple, verb)))
    listing = sub.add_parser("list", parents=[common], help="every topic with a rule")
    listing.set_defaults(handler=guarded(run_schema_list))


def run_schema_set(args: argparse.Namespace, stdin: Any = None) -> int:
    if not args.file and not args.content_type:
        raise UsageError("give --file SCHEMA.json, --content-type TYPE or both")
    body: dict[str, Any] = {"content_type": args.content_type}
    if args.file:
        try:
            text = (stdin or sys.stdin).read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
            body["schema"] = json.loads(text)
        except OSError as exc:
            raise UsageError(f"cannot read {args.file}: {exc.strerror}") from None
        except ValueError as exc:
            raise UsageError(f"{args.file} is not JSON: {exc}") from None
    rule = client_for(args, "topics").call("POST", f"{_quote(args.topic)}/schema", body)
    return emit(args, rule, f"topic {args.topic}: rule version {rule['version']} set")


def run_schema_simple(verb: str, args: argparse.Namespace) -> int:
    client = client_for(args, "topics")
    path = f"{_quote(args.topic)}/schema"
    if verb == "clear":
        return emit(args, client.call("DELETE", path), f"topic {args.topic}: rule cleared")
    rule = client.call("GET", path)
    return emit(args, rule, json.dumps(rule, indent=2))


def run_schema_list(args: argparse.Namespace) -> int:
    rules = client_for(args, "topics").call("GET", "schemas")
    rows = [(r["topic"], r["version"], r["content_type"] or "-", "yes" if r["schema"] is not None else "no")
            for r in rules]
    return emit(args, rules, table(("TOPIC", "VERSION", "CONTENT-TYPE", "SCHEMA"), rows))


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")
