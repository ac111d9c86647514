"""Grouped bar charts as standalone SVG, for bench reports and the broker comparison scripts.

No plotting library: the charts are a few rectangles and labels, and an SVG file opens in any browser and renders
in Markdown on the forges, so docs/performance.md can link it. Values that are missing (a broker that did not run a
scenario) leave a gap in their group instead of a zero bar.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
WIDTH, HEIGHT = 760, 360
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 70, 20, 50, 80


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^k that is at least `value` (the top of the y axis)."""
    if value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        top = step * 10 ** exponent
        if top >= value:
            return float(top)
    return float(10 ** (exponent + 1))  # pragma: no cover - the loop always returns


def bar_chart_svg(title: str, unit: str, categories: Sequence[str],
                  series: Mapping[str, Sequence[float | None]]) -> str:
    """One group of bars per category, one bar per series (broker, percentile...) in a fixed colour."""
    for name, values in series.items():
        if len(values) != len(categories):
            raise ValueError(f"series {name!r} has {len(values)} values for {len(categories)} categories")
    known = [v for values in series.values() for v in values if v is not None]
    top = nice_ceiling(max(known, default=0.0))
    plot_w, plot_h = WIDTH - MARGIN_LEFT - MARGIN_RIGHT, HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    group_w = plot_w / max(len(categories), 1)
    bar_w = group_w * 0.8 / max(len(series), 1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>']
    for tick in range(5):  # y axis: 0, top/4, ..., top
        value = top * tick / 4
        y = MARGIN_TOP + plot_h - plot_h * tick / 4
        out.append(f'<line x1="{MARGIN_LEFT}" y1="{y:.1f}" x2="{WIDTH - MARGIN_RIGHT}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{MARGIN_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{value:,.6g}</text>')
    out.append(f'<text x="16" y="{MARGIN_TOP + plot_h / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {MARGIN_TOP + plot_h / 2})">{escape(unit)}</text>')
    for index, category in enumerate(categories):
        left = MARGIN_LEFT + index * group_w + group_w * 0.1
        for position, (name, values) in enumerate(series.items()):
            value = values[index]
            if value is None:
                continue
            height = plot_h * value / top
            x, y = left + position * bar_w, MARGIN_TOP + plot_h - height
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w * 0.92:.1f}" height="{height:.1f}" '
                       f'fill="{PALETTE[position % len(PALETTE)]}"><title>{escape(name)}: {value:,.6g} '
                       f'{escape(unit)}</title></rect>')
        out.append(f'<text x="{left + group_w * 0.4:.1f}" y="{HEIGHT - MARGIN_BOTTOM + 16}" '
                   f'text-anchor="middle">{escape(category)}</text>')
    for position, name in enumerate(series):  # legend under the axis labels
        x = MARGIN_LEFT + position * 150
        y = HEIGHT - 24
        out.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{PALETTE[position % len(PALETTE)]}"/>')
        out.append(f'<text x="{x + 14}" y="{y}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def latency_chart_svg(title: str, reports: Mapping[str, Mapping[str, Any]]) -> str:
    """p50 / p99 / p99.9 in ms of each report's `latency_ms` (a bench run's end-to-end latency), per name."""
    percentiles = ("p50", "p99", "p999")
    return bar_chart_svg(title, "ms", ["p50", "p99", "p99.9"], {
        name: [_number(report.get("latency_ms", {}).get(p)) for p in percentiles] for name, report in reports.items()})


def write_svg(path: str | Path, svg: str) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(svg)
    return target


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def add_plot_option(parser: Any) -> None:
    """`--plot FILE` for a bench driver's parser."""
    parser.add_argument("--plot", metavar="FILE", default="",
                        help="also write the run's latency percentiles (end-to-end, publish-to-ack) as an SVG chart")


def plot_report(path: str, report: Mapping[str, Any], title: str) -> Path | None:
    """Write a bench report's end-to-end and publish-to-ack percentiles to `path` (nothing when `path` is empty)."""
    if not path:
        return None
    percentiles = ("p50", "p99", "p999")
    series = {label: [_number(report.get(key, {}).get(p)) for p in percentiles]
              for label, key in (("end-to-end", "latency_ms"), ("publish-to-ack", "ack_latency_ms"))}
    return write_svg(path, bar_chart_svg(title, "ms", ["p50", "p99", "p99.9"], series))
