"""Bench charts: `tidegate bench ... --plot FILE` and the comparison scripts write standalone SVG bar charts."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tidegate.gateway.bench.plot import bar_chart_svg, nice_ceiling, plot_report

SVG = "{http://www.w3.org/2000/svg}"
BENCH_TIMEOUT_S = 120


def bars(svg: str) -> list[tuple[float, str]]:
    """(height, tooltip) of every data bar (the background rect has no tooltip)."""
    root = ET.fromstring(svg)
    found = []
    for rect in root.iter(f"{SVG}rect"):
        title = rect.find(f"{SVG}title")
        if title is not None:
            found.append((float(rect.get("height", "0")), title.text or ""))
    return found


@pytest.mark.parametrize(("value", "top"), [(0, 1.0), (0.7, 1.0), (1.0, 1.0), (13, 20.0), (2_400, 2_500.0),
                                            (61_000, 100_000.0), (219_516, 250_000.0)])
def test_the_y_axis_ends_at_a_round_number_at_or_above_the_largest_value(value: float, top: float) -> None:
    assert nice_ceiling(value) == top


def test_a_chart_has_one_bar_per_known_value_in_proportion_and_skips_missing_ones() -> None:
    svg = bar_chart_svg("MQTT <QoS 1>", "msg/s", ["1→1", "fan-in"],
                        {"tidegate": [20_000, 10_000], "mosquitto": [40_000, None]})
    drawn = bars(svg)
    assert [tooltip for _, tooltip in drawn] == ["tidegate: 20,000 msg/s", "mosquitto: 40,000 msg/s",
                                                 "tidegate: 10,000 msg/s"]
    heights = [height for height, _ in drawn]
    assert heights[1] == pytest.approx(2 * heights[0], rel=0.01) and heights[0] == pytest.approx(2 * heights[2])
    assert "MQTT &lt;QoS 1&gt;" in svg  # titles and labels are escaped: the file stays well-formed XML


def test_a_series_with_the_wrong_number_of_values_is_refused() -> None:
    with pytest.raises(ValueError, match="2 values for 3 categories"):
        bar_chart_svg("t", "ms", ["a", "b", "c"], {"x": [1, 2]})


def test_plot_report_draws_end_to_end_and_publish_to_ack_percentiles(tmp_path: Path) -> None:
    report = {"latency_ms": {"p50": 0.5, "p99": 1.5, "p999": 3.0}, "ack_latency_ms": {"p50": 0.3, "p99": 0.9}}
    target = plot_report(str(tmp_path / "charts" / "latency.svg"), report, "run")
    assert target is not None
    tooltips = [tooltip for _, tooltip in bars(target.read_text())]
    assert tooltips == ["end-to-end: 0.5 ms", "publish-to-ack: 0.3 ms", "end-to-end: 1.5 ms",
                        "publish-to-ack: 0.9 ms", "end-to-end: 3 ms"]
    assert plot_report("", report, "run") is None


def test_bench_native_plot_option_writes_the_latency_chart(tmp_path: Path) -> None:
    chart = tmp_path / "native.svg"
    completed = subprocess.run([sys.executable, "-m", "tidegate.gateway", "bench", "native", "--spawn-broker",
                                "--duration", "1", "--rate", "200", "--json", "--plot", str(chart)],
                               capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    drawn = bars(chart.read_text())
    assert len(drawn) >= 5 and f"end-to-end: {report['latency_ms']['p50']:,.6g} ms" == drawn[0][1]


def test_the_mqtt_comparison_script_draws_its_results(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "interop"))
    try:
        import bench_mqtt_compare
    finally:
        sys.path.pop(0)
    results = {"scenarios": {
        "qos1_1to1": {"tidegate-sync": {"receive_msgs_per_s": 30_000}, "mosquitto": {"receive_msgs_per_s": 60_000}},
        "qos1_latency": {"tidegate-sync": {"latency_ms": {"p50": 0.4, "p99": 0.8}},
                         "mosquitto": {"latency_ms": {"p50": 0.05, "p99": 0.1}}}}}
    written = bench_mqtt_compare.write_plots(results, ["tidegate-sync", "mosquitto"], tmp_path)
    assert [p.name for p in written] == ["throughput.svg", "latency.svg"]
    assert [t for _, t in bars(written[0].read_text())] == ["tidegate-sync: 30,000 msg/s", "mosquitto: 60,000 msg/s"]
