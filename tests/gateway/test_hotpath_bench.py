"""The in-process hot-path harness (gateway/bench/hotpath.py) moves every message through a real store and the
adapters, for each scenario, and reports CPU per message."""

import pytest

from tidegate.gateway.bench import hotpath


@pytest.mark.parametrize("scenario", ["mqtt1", "mqtt0", "native"])
def test_each_scenario_delivers_every_message(tmp_path, scenario):
    if scenario == "native":
        cpu = hotpath.run_native(200, 64, str(tmp_path))
    else:
        cpu = hotpath.run_mqtt(200, 64, int(scenario[-1]), str(tmp_path))
    assert cpu > 0  # it raises SystemExit if a message is missing


def test_main_prints_cpu_per_message(capsys):
    hotpath.main(["mqtt1", "--messages", "100", "--repeat", "1"])
    assert "mqtt1: broker CPU per message" in capsys.readouterr().out
