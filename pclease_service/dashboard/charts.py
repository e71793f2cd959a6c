"""Pictures drawn on the server as inline SVG: no chart library, nothing fetched.

``usage_chart`` stacks the instances up over a window by state (running, idle, starting
or stopping) and draws the cost accumulated over the window as a line. ``run_timeline``
draws one bar per lease of a DAG run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape

from markupsafe import Markup

from pclease_service.metrics import Interval
from pclease_service.store import LeaseRecord

_W, _H = 960, 240
_LEFT, _RIGHT, _TOP, _BOTTOM = 44, 64, 12, 26
_LAYERS = (
    ("running", ("running",)),
    ("idle", ("idle",)),
    ("transition", ("starting", "stopping")),
)


@dataclass(frozen=True)
class Usage:
    """What the chart shows, also handy for the tiles beside it."""

    svg: Markup
    peak: float
    cost: float
    idle_seconds: float
    idle_cost: float
    up_seconds: float


def _overlap(start: datetime, end: datetime, lo: datetime, hi: datetime) -> float:
    return max(0.0, (min(end, hi) - max(start, lo)).total_seconds())


def _nice(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is at least ``value``."""
    if value <= 0:
        return 1.0
    power = 1.0
    while power * 10 <= value:
        power *= 10
    while power > value:
        power /= 10
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power


def _money(value: float) -> str:
    return f"${value:,.2f}" if value >= 1 or value == 0 else f"${value:.3f}"


def _divisions(top: float) -> int:
    """5 gridlines when top / 5 is a round step (1, 2, 5 x 10^k), else 4."""
    step = top / 5
    return 5 if abs(_nice(step) - step) <= 1e-9 * step else 4


def usage_chart(
    intervals: Sequence[Interval], now: datetime, window: timedelta, buckets: int = 72
) -> Usage:
    start = now - window
    width = window / buckets
    stacks = [[0.0] * buckets for _ in _LAYERS]
    cost = [0.0] * buckets
    idle_s = idle_cost = up_s = 0.0
    for item in intervals:
        end = item.end or now
        if end <= start:
            continue
        which = next(i for i, (_, states) in enumerate(_LAYERS) if item.state in states)
        first = max(0, int((max(item.start, start) - start) / width))
        last = min(buckets - 1, int((min(end, now) - start) / width))
        for b in range(first, last + 1):
            lo = start + width * b
            seconds = _overlap(item.start, end, lo, lo + width)
            stacks[which][b] += seconds / width.total_seconds()
            cost[b] += seconds * item.hourly_cost / 3600
            up_s += seconds
            if item.state == "idle":
                idle_s += seconds
                idle_cost += seconds * item.hourly_cost / 3600
    totals = [sum(layer[b] for layer in stacks) for b in range(buckets)]
    peak = max(totals, default=0.0)
    y_max = _nice(max(peak, 1.0))
    cumulative = []
    running = 0.0
    for c in cost:
        running += c
        cumulative.append(running)
    cost_max = _nice(running) if running > 0 else 1.0

    plot_w = _W - _LEFT - _RIGHT
    plot_h = _H - _TOP - _BOTTOM

    def x(b: float) -> float:
        return _LEFT + plot_w * b / buckets

    def y(v: float) -> float:
        return _TOP + plot_h * (1 - v / y_max)

    def y_cost(v: float) -> float:
        return _TOP + plot_h * (1 - v / cost_max)

    parts = [
        f'<svg class="chart" viewBox="0 0 {_W} {_H}" role="img" '
        f'aria-label="instances and cost over the last {_span(window)}">'
    ]
    # grid and left axis (instances)
    divisions = _divisions(y_max)
    for i in range(divisions + 1):
        v = y_max * i / divisions
        parts.append(
            f'<line class="grid" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y(v):.1f}" y2="{y(v):.1f}"/>'
            f'<text class="axis" x="{_LEFT - 6}" y="{y(v) + 4:.1f}" text-anchor="end">'
            f"{v:g}</text>"
            f'<text class="axis cost" x="{_W - _RIGHT + 6}" y="{y(v) + 4:.1f}">'
            f"{escape(_money(cost_max * i / divisions))}</text>"
        )
    # stacked step areas, bottom layer first
    base: list[float] = [0.0] * buckets
    for (name, _), layer in zip(_LAYERS, stacks, strict=True):
        top = [base[b] + layer[b] for b in range(buckets)]
        if any(layer):
            points = []
            for b in range(buckets):
                points += [f"{x(b):.1f},{y(top[b]):.1f}", f"{x(b + 1):.1f},{y(top[b]):.1f}"]
            for b in reversed(range(buckets)):
                points += [f"{x(b + 1):.1f},{y(base[b]):.1f}", f"{x(b):.1f},{y(base[b]):.1f}"]
            parts.append(f'<polygon class="area {name}" points="{" ".join(points)}"/>')
        base = top
    # cost line
    if running > 0:
        line = " ".join(f"{x(b + 1):.1f},{y_cost(v):.1f}" for b, v in enumerate(cumulative))
        parts.append(f'<polyline class="costline" points="{x(0):.1f},{y_cost(0):.1f} {line}"/>')
    # time axis
    for i in range(7):
        pos = buckets * i / 6
        at = start + width * pos
        anchor = "start" if i == 0 else "end" if i == 6 else "middle"
        parts.append(
            f'<text class="axis" x="{x(pos):.1f}" y="{_H - 8}" text-anchor="{anchor}">'
            f"{at:%H:%M}</text>"
        )
    # hover targets: one column per bucket
    for b in range(buckets):
        at = start + width * b
        label = (
            f"{at:%H:%M}: {stacks[0][b]:.1f} running, {stacks[1][b]:.1f} idle, "
            f"{stacks[2][b]:.1f} starting/stopping; {_money(cumulative[b])} so far"
        )
        parts.append(
            f'<rect class="hover" x="{x(b):.1f}" y="{_TOP}" width="{plot_w / buckets:.2f}" '
            f'height="{plot_h}"><title>{escape(label)}</title></rect>'
        )
    if peak == 0:
        parts.append(
            f'<text class="empty" x="{_LEFT + plot_w / 2}" y="{_TOP + plot_h / 2}" '
            f'text-anchor="middle">nothing ran in the last {_span(window)}</text>'
        )
    parts.append("</svg>")
    svg = Markup("".join(parts))  # noqa: S704 -- numbers, times and escape()d text only
    return Usage(svg, peak, running, idle_s, idle_cost, up_s)


def _span(window: timedelta) -> str:
    hours = window.total_seconds() / 3600
    return f"{hours:g} hour" + ("" if hours == 1 else "s")


def run_timeline(leases: Sequence[LeaseRecord], now: datetime) -> Markup:
    """One bar per lease: pale while waiting for its context, coloured while held."""
    if not leases:
        return Markup("")
    first = min(lease.created_at for lease in leases)
    last = max(lease.ended_at or now for lease in leases)
    span = max((last - first).total_seconds(), 1.0)
    row, label_w, width = 22, 220, _W
    plot_w = width - label_w - 20
    height = row * len(leases) + 24

    def x(at: datetime) -> float:
        return label_w + plot_w * (at - first).total_seconds() / span

    parts = [f'<svg class="timeline" viewBox="0 0 {width} {height}" role="img">']
    for i, lease in enumerate(leases):
        top = i * row + 4
        end = lease.ended_at or now
        held_from = lease.activated_at or end
        name = lease.task_id or lease.id[:8]
        parts.append(
            f'<text class="axis" x="{label_w - 8}" y="{top + 13}" text-anchor="end">'
            f"{escape(name[:32])}</text>"
        )
        if held_from > lease.created_at:
            parts.append(
                f'<rect class="wait" x="{x(lease.created_at):.1f}" y="{top}" '
                f'width="{max(1.0, x(held_from) - x(lease.created_at)):.1f}" height="16" rx="3">'
                f"<title>{escape(name)}: waited for its context</title></rect>"
            )
        if end > held_from:
            held = (end - held_from).total_seconds()
            parts.append(
                f'<rect class="held {lease.state.value}" x="{x(held_from):.1f}" y="{top}" '
                f'width="{max(1.0, x(end) - x(held_from)):.1f}" height="16" rx="3">'
                f"<title>{escape(name)}: {lease.state.value}, held {held:.0f} s</title></rect>"
            )
    parts.append(
        f'<text class="axis" x="{label_w}" y="{height - 4}">{first:%H:%M:%S}</text>'
        f'<text class="axis" x="{width - 20}" y="{height - 4}" text-anchor="end">'
        f"{last:%H:%M:%S}</text></svg>"
    )
    return Markup("".join(parts))  # noqa: S704 -- numbers, times and escape()d text only
