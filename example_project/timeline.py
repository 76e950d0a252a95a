"""A timeline picture of a scenario, as a hand-written SVG (no plotting library).

Rows: the beats, then the workers; x: seconds from the first heartbeat. On a beat's row, a
green bar while it held the leader lock (as sampled from Consul) and a dot for each tick it
sent; on a worker's row, a dot for each tick it ran (joined to its sender by a thin line) and
a ring for each copy it skipped. A process's grey line ends where it stopped; the failovers
are red dashed lines, with the time until the first tick of the new leader shaded.
"""

from __future__ import annotations

import math
from html import escape

from .analysis import Analysis
from .cluster import Observation

__all__ = ["render_svg"]

WIDTH = 980
LEFT, RIGHT, TOP = 80, 20, 76
ROW = 34
COLOURS = {"leader": "#4caf50", "tick": "#1f4e99", "dup": "#d32f2f", "failover": "#d32f2f", "life": "#b0b0b0"}


def render_svg(obs: Observation, result: Analysis) -> str:
    """The picture of ``obs`` (with the verdict of ``result`` in its title), as SVG text."""
    members = [*obs.beats, *obs.workers]
    t_from = min(m.started for m in members) - 0.5
    t_to = max([obs.ended, *(m.stopped or obs.ended for m in members), *(r["t"] for r in obs.runs)]) + 0.5
    scale = (WIDTH - LEFT - RIGHT) / (t_to - t_from)
    height = TOP + ROW * len(members) + 90
    ys = {m.name: TOP + ROW * i + ROW / 2 for i, m in enumerate(members)}

    def x(t: float) -> float:
        return round(LEFT + (t - t_from) * scale, 1)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" '
        'font-family="Helvetica, Arial, sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
        _text(
            LEFT,
            18,
            f"make demo EXAMPLE={obs.example.name} ({obs.example.scheduler_label}): {len(obs.beats)} beats, "
            f"{len(obs.workers)} workers, heartbeat every {obs.interval:g} s",
            weight="bold",
            size=14,
        ),
        _text(
            LEFT,
            36,
            f"{len(result.rows)} ticks, duplicates {len(result.duplicates)}, missed {result.missed_count}, "
            f"collapsed into catch-up runs {result.collapsed}",
        ),
    ]
    # Time axis: a grid line every 5 s (10 s on long runs), 0 = the first heartbeat.
    step = 5 if t_to - t_from <= 70 else 10
    axis_y = TOP + ROW * len(members)
    for s in range(math.ceil((t_from - obs.first_tick) / step) * step, int(t_to - obs.first_tick) + 1, step):
        gx = x(obs.first_tick + s)
        out.append(f'<line x1="{gx}" y1="{TOP}" x2="{gx}" y2="{axis_y}" stroke="#eeeeee"/>')
        out.append(_text(gx, axis_y + 16, f"{s} s", anchor="middle", colour="#555555"))
    for i, f in enumerate(obs.failovers):
        end = f.first_tick or f.takeover or f.at
        out.append(
            f'<rect x="{x(f.at)}" y="{TOP}" width="{max(1.0, x(end) - x(f.at))}" height="{axis_y - TOP}" '
            'fill="#d32f2f" fill-opacity="0.08"/>'
        )
        out.append(
            f'<line x1="{x(f.at)}" y1="{TOP - 8 - 14 * (i % 2)}" x2="{x(f.at)}" y2="{axis_y}" stroke="{COLOURS["failover"]}" '
            'stroke-dasharray="4 3"/>'
        )
        label = f"{f.signal} {f.old}" + (f" → {f.new} ({end - f.at:.1f} s)" if f.new else "")
        out.append(_text(x(f.at) + 3, TOP - 10 - 14 * (i % 2), label, colour=COLOURS["failover"], size=11))
    for m in members:
        y = ys[m.name]
        out.append(_text(LEFT - 10, y + 4, m.name, anchor="end", weight="bold"))
        out.append(
            f'<line x1="{x(m.started)}" y1="{y}" x2="{x(m.stopped or obs.ended)}" y2="{y}" stroke="{COLOURS["life"]}" '
            'stroke-width="2"/>'
        )
    stopped = {m.name: m.stopped for m in obs.beats if m.how == "SIGKILL"}
    for who, start, end in obs.tenures():
        if who not in ys:
            continue
        alive_to = min(end, stopped.get(who) or end)
        out.append(
            f'<rect x="{x(start)}" y="{ys[who] - 7}" width="{max(1.0, x(alive_to) - x(start))}" height="14" rx="3" '
            f'fill="{COLOURS["leader"]}" fill-opacity="0.45"/>'
        )
        if end > alive_to:  # a killed leader's session holds the lock until Consul ends it
            out.append(
                f'<rect x="{x(alive_to)}" y="{ys[who] - 7}" width="{max(1.0, x(end) - x(alive_to))}" height="14" rx="3" '
                f'fill="none" stroke="{COLOURS["leader"]}" stroke-dasharray="3 2"/>'
            )
    for m in obs.beats:
        if m.how == "SIGKILL":
            out.append(_text(x(m.stopped or obs.ended), ys[m.name] + 5, "✕", anchor="middle", colour=COLOURS["dup"], size=15))
    for row in result.rows:
        colour = COLOURS["dup"] if row.runs > 1 else COLOURS["tick"]
        for record in (r for r in obs.runs if r.get("tick") == row.tick):
            if record["beat"] in ys and record["worker"] in ys:
                out.append(
                    f'<line x1="{x(record["t"])}" y1="{ys[record["beat"]]}" x2="{x(record["t"])}" y2="{ys[record["worker"]]}" '
                    f'stroke="{colour}" stroke-opacity="0.18"/>'
                )
            for name in (record["beat"], record["worker"]):
                if name in ys:
                    out.append(f'<circle cx="{x(record["t"])}" cy="{ys[name]}" r="3.5" fill="{colour}"/>')
    for skip in obs.skips:
        if skip.get("worker") in ys:
            out.append(f'<circle cx="{x(skip["t"])}" cy="{ys[skip["worker"]]}" r="5" fill="none" stroke="{COLOURS["tick"]}"/>')
    legend_y = axis_y + 40
    lx = LEFT
    legend = [
        (f'<rect x="{lx}" y="{legend_y - 6}" width="22" height="12" rx="3" fill="{COLOURS["leader"]}" fill-opacity="0.45"/>',
         28, 0, "holds the leader lock"),
        (f'<rect x="{lx + 160}" y="{legend_y - 6}" width="22" height="12" rx="3" fill="none" stroke="{COLOURS["leader"]}" '
         'stroke-dasharray="3 2"/>', 188, 0, "killed leader's session, until Consul ends it"),
        (f'<circle cx="{lx + 5}" cy="{legend_y + 20}" r="3.5" fill="{COLOURS["tick"]}"/>', 28, 20, "tick sent / run"),
        (f'<circle cx="{lx + 130}" cy="{legend_y + 20}" r="5" fill="none" stroke="{COLOURS["tick"]}"/>', 150, 20, "copy skipped"),
        (f'<line x1="{lx + 250}" y1="{legend_y + 13}" x2="{lx + 250}" y2="{legend_y + 27}" stroke="{COLOURS["failover"]}" '
         'stroke-dasharray="4 3"/>', 258, 20, "leader stopped; shaded until the new leader's first tick"),
    ]  # fmt: skip
    for mark, offset, dy, label in legend:
        out.append(mark)
        out.append(_text(lx + offset, legend_y + dy + 4, label, colour="#333333", size=11))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _text(
    x: float, y: float, text: str, *, anchor: str = "start", weight: str = "normal", size: int = 12, colour: str = "#000000"
) -> str:
    return (
        f'<text x="{x}" y="{y}" text-anchor="{anchor}" font-weight="{weight}" font-size="{size}" fill="{colour}">'
        f"{escape(text)}</text>"
    )
