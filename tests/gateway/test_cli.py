"""The `tidegate` command line: config show, version, argument errors (exit 2, one line) and command registration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tidegate.gateway import cli


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TIDEGATE_"):
            monkeypatch.delenv(name)


def test_config_show_prints_the_merged_config_as_toml_with_sources(capsys, monkeypatch, tmp_path: Path) -> None:
    config_file = tmp_path / "t.toml"
    config_file.write_text('[storage]\nretention_hours = 1\n')
    monkeypatch.setenv("TIDEGATE_STORAGE__FLUSH", "async")
    code, out, err = run_main(capsys, "config", "show", "--config", str(config_file), "--native-port", "0",
                              "--set", "listeners.admin.port=0")
    assert (code, err) == (0, "")
    parsed = tomllib.loads(out)
    assert parsed["storage"]["flush"] == "async"
    assert parsed["storage"]["retention_hours"] == 1
    assert parsed["listeners"]["native"]["port"] == 0
    assert parsed["listeners"]["admin"]["port"] == 0
    assert "# env TIDEGATE_STORAGE__FLUSH" in out
    assert f"# file {config_file}" in out
    assert "# cli --native-port" in out
    assert "# cli --set listeners.admin.port=0" in out


def test_config_show_json_prints_nested_config_and_optionally_sources(capsys) -> None:
    code, out, _ = run_main(capsys, "config", "show", "--json", "--flush", "async")
    assert code == 0
    assert json.loads(out)["storage"]["flush"] == "async"
    code, out, _ = run_main(capsys, "config", "show", "--json", "--sources", "--data-dir", "/srv/tg")
    payload = json.loads(out)
    assert payload["config"]["broker"]["data_dir"] == "/srv/tg"
    assert payload["sources"]["broker.data_dir"] == "cli --data-dir"


def test_shortcut_wins_over_set_of_the_same_key(capsys) -> None:
    code, out, _ = run_main(capsys, "config", "show", "--json", "--set", "storage.flush=sync", "--flush", "async")
    assert code == 0
    assert json.loads(out)["storage"]["flush"] == "async"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("config", "show", "--flush", "sometimes"), 'storage.flush must be one of sync, async, got "sometimes"'),
        (("config", "show", "--set", "storage.nope=1"), "unknown key storage.nope (from cli --set storage.nope=1)"),
        (("config", "show", "--native-port", "x"), 'listeners.native.port must be an integer, got string "x"'),
        (("config", "show", "--set", "novalue"), "--set expects key=value"),
        (("serve", "--admin-port", "-1"), "listeners.admin.port must be a port number 0-65535, got -1"),
        (("serve", "--no-such-option"), "unrecognized arguments: --no-such-option"),
        (("frobnicate",), "invalid choice: 'frobnicate'"),
        ((), "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments_exit_2_with_one_line_and_no_traceback(capsys, argv: tuple[str, ...], expected: str) -> None:
    code, out, err = run_main(capsys, *argv)
    assert code == 2
    assert out == ""
    assert expected in err
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_bad_environment_value_exits_2_naming_the_variable(capsys, monkeypatch) -> None:
    monkeypatch.setenv("TIDEGATE_LOG__LEVEL", "loud")
    code, _, err = run_main(capsys, "serve")
    assert code == 2
    assert err == ('tidegate serve: error: log.level must be one of debug, info, warning, error, critical, '
                   'got "loud" (from env TIDEGATE_LOG__LEVEL)\n')


def test_version_prints_the_package_version(capsys) -> None:
    code, out, _ = run_main(capsys, "version")
    assert code == 0
    assert out.startswith(f"tidegate {cli.package_version()} (Python ")


def test_help_exits_0(capsys) -> None:
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    assert "serve" in out and "config" in out and "version" in out


def test_modules_named_cli_star_register_their_own_commands(capsys, monkeypatch, tmp_path: Path) -> None:
    module_dir = tmp_path / "plugins"
    module_dir.mkdir()
    (module_dir / "fake_cli_hello.py").write_text(
        "def register(commands):\n"
        "    parser = commands.add_parser('hello', help='say hello')\n"
        "    parser.add_argument('name')\n"
        "    parser.set_defaults(handler=lambda args: print(f'hello {args.name}') or 0)\n"
    )
    monkeypatch.syspath_prepend(str(module_dir))
    monkeypatch.setattr(cli, "command_modules", lambda: ["fake_cli_hello"])
    code, out, _ = run_main(capsys, "hello", "tide")
    assert (code, out) == (0, "hello tide\n")


def test_command_modules_are_found_by_the_cli_prefix() -> None:
    assert all(name.startswith("tidegate.gateway.cli_") for name in cli.command_modules())


def test_the_installed_entry_point_reports_config_errors_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[storage]\nflush = 'nightly'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEGATE_")}
    result = subprocess.run([sys.executable, "-m", "tidegate.gateway", "serve", "--config", str(bad)],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (f'tidegate serve: error: storage.flush must be one of sync, async, got "nightly" '
                             f"(from file {bad})\n")
