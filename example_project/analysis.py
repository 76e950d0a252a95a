"""Judge an :class:`~example_project.cluster.Observation`: did each tick run once, and none go missing?

The rules follow from how celery beat schedules an interval entry, which the leader-elected
schedulers keep (Celery's "run once" semantics):

- **The chain.** A tick's due time (its id, ``heartbeat@<due>``) is the previous tick's send
  time plus the interval — also for the first tick a new leader sends, since it continues
  from the state the old leader stored. A run happens after its send, so for consecutive ticks
  *a*, *b*: ``due(b) <= ran(a) + interval``. A tick due later than that means due times were
  passed over: **missed**.
- **Catch-up.** Ticks that fell due while nobody led are not sent one by one: the new leader
  sends one late run for all of them (its id is the first of them), and the next due time
  counts from that run. They are **collapsed**, not missed — provided that catch-up run
  comes within the failover bound (crash: check TTL + lock-delay + the lock-delay poll; SIGTERM: a
  standby poll and a release), plus a standby poll to the new leader's first send.
- **On time.** Any other run must come within ``LATENESS`` of its due time; a later one
  means due times passed with nothing running: **missed**. So does a gap before the end.
- **Duplicates.** A tick id whose body ran more than once, or two ticks closer together than
  the interval (a second sender's chain).

The figures are computed, never asserted here: :attr:`Analysis.ok` is the verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone

from celery_consul_lock import Tick

from .cluster import CRASH_BOUND, FIRST_SEND, TERM_BOUND, Failover, Observation

__all__ = ["LATENESS", "Analysis", "TickRow", "analyse", "describe"]

#: A run may start this long after its tick was due (send, queue, worker pickup on a busy
#: 2-CPU machine); the chain rule allows the same for a send.
LATENESS = 1.5
#: Tick ids are truncated to the millisecond; allow that and clock reads around it.
TOLERANCE = 0.05
BOUNDS = {"SIGKILL": CRASH_BOUND, "SIGTERM": TERM_BOUND}


@dataclass(frozen=True)
class TickRow:
    """One tick id: who sent it, where and how often it ran."""

    tick: str
    due: float
    ran: float
    beat: str
    workers: tuple[str, ...]
    runs: int
    skipped: int
    note: str = ""


@dataclass
class Analysis:
    rows: list[TickRow]
    #: Tick ids whose body ran more than once, or that came from a second chain.
    duplicates: list[str] = field(default_factory=list)
    #: (count, why) for each place where due times passed with no run covering them.
    missed: list[tuple[int, str]] = field(default_factory=list)
    #: Due times that fell while nobody led, covered by a catch-up run.
    collapsed: int = 0
    #: Records that are not ticks of the heartbeat (no id): a problem of their own.
    malformed: list[dict] = field(default_factory=list)

    @property
    def missed_count(self) -> int:
        return sum(n for n, _ in self.missed)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and not self.duplicates and not self.missed and not self.malformed


def _due(tick: str) -> float:
    return Tick.parse(tick).epoch


def analyse(obs: Observation) -> Analysis:
    """Apply the module's rules to what the scenario recorded."""
    interval = obs.interval
    malformed = [r for r in obs.runs if not r.get("tick")]
    by_tick: dict[str, list[dict]] = {}
    for record in sorted((r for r in obs.runs if r.get("tick")), key=lambda r: r["t"]):
        by_tick.setdefault(record["tick"], []).append(record)
    skipped: dict[str, list[str]] = {}
    for skip in obs.skips:
        if skip.get("tick"):
            skipped.setdefault(skip["tick"], []).append(skip["reason"])
    ticks = sorted(by_tick, key=_due)
    result = Analysis([], malformed=malformed)
    result.duplicates = [t for t in ticks if len(by_tick[t]) > 1]
    notes: dict[str, str] = {}
    chain = ticks[:1]  # the ticks of the one chain; an extra tick is left out of it
    for b in ticks[1:]:
        a = chain[-1]
        first_a, first_b = by_tick[a][0], by_tick[b][0]
        due_a, due_b, ran_a, ran_b = _due(a), _due(b), first_a["t"], first_b["t"]
        if due_b - due_a < interval - TOLERANCE:
            result.duplicates.append(b)
            notes[b] = "EXTRA: closer than the interval to the previous tick"
            continue
        chain.append(b)
        jump = due_b - (ran_a + interval)
        if jump > TOLERANCE:
            n = max(1, round(jump / interval))
            result.missed.append((n, f"{b}: due {jump:.2f} s after the previous run + the interval"))
            notes[b] = f"MISSED {n} before it"
        failover = _failover_between(obs.failovers, ran_a, ran_b) if first_b["beat"] != first_a["beat"] else None
        if first_b["beat"] != first_a["beat"]:
            at = failover.at if failover else ran_a
            bound = BOUNDS.get(failover.signal, CRASH_BOUND) if failover else CRASH_BOUND
            late = ran_b - max(due_b, at + bound + FIRST_SEND) - LATENESS
            collapsed = max(0, math.floor((ran_b - due_b) / interval))
            result.collapsed += collapsed
            cause = f"{failover.signal} of {failover.old}" if failover else "an unplanned change of leader"
            what = f"catch-up ({collapsed} collapsed into it)" if collapsed else "first tick"
            notes[b] = f"{notes.get(b, '')} {what} of the new leader after {cause}".strip()
            if late > 0:
                n = max(1, math.floor(late / interval))
                result.missed.append((n, f"{b}: catch-up {late:.2f} s past the failover bound"))
        elif ran_b - due_b > LATENESS:
            n = max(1, math.floor((ran_b - due_b) / interval))
            result.missed.append((n, f"{b}: ran {ran_b - due_b:.2f} s after it was due"))
            notes[b] = (notes.get(b, "") + " LATE").strip()
    if ticks:
        tail = obs.ended - (by_tick[ticks[-1]][0]["t"] + interval) - LATENESS
        if tail > 0:
            result.missed.append((max(1, math.floor(tail / interval) + 1), f"no run in the last {tail + LATENESS:.2f} s"))
    for t in ticks:
        records = by_tick[t]
        note = notes.get(t, "")
        if len(records) > 1:
            note = f"DUPLICATE {note}".strip()
        reasons = skipped.get(t, [])
        if reasons:
            note = f"{note}; a copy skipped ({', '.join(sorted(set(reasons)))})".lstrip("; ")
        result.rows.append(
            TickRow(
                tick=t,
                due=_due(t),
                ran=records[0]["t"],
                beat=records[0]["beat"] or "?",
                workers=tuple(r["worker"] for r in records),
                runs=len(records),
                skipped=len(skipped.get(t, [])),
                note=note,
            )
        )
    return result


def _failover_between(failovers: list[Failover], start: float, end: float) -> Failover | None:
    return next((f for f in failovers if start <= f.at <= end), None)


def _clock(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%H:%M:%S.%f")[:-3]


#: The legend printed under the table.
COLUMNS = (
    "  (due: the tick's due time, its id; ran +s: when its first run started, in seconds from the\n"
    "   first tick's run; sent by: the beat that sent it; ran on: the worker(s) that ran its body;\n"
    "   runs: how many times its body ran; skipped: copies the workers skipped, with the reason in note)"
)


def _first_tick(f: Failover, result: Analysis) -> str:
    """What the new leader's first tick did, against the failover bound: a tick not yet due
    at the bound waits for its due time, which is not a bound exceeded."""
    if f.first_tick is None:
        return "no tick from another beat"
    bound = BOUNDS[f.signal] + FIRST_SEND
    ran = f.first_tick - f.at
    row = next((r for r in result.rows if r.ran == f.first_tick), None)
    due = row.due - f.at if row is not None else None
    if due is not None and due > bound:
        return (
            f"its first tick was due {due:.2f} s after the signal, after the bound ({bound:.2f} s), "
            f"and ran {ran - due:.2f} s after its due time"
        )
    return (
        f"its first tick ran after {ran:.2f} s (bound {BOUNDS[f.signal]:.2f} s to lead + {FIRST_SEND:g} s to its "
        f"first send, + {LATENESS:g} s to send and start a run)"
    )


def describe(obs: Observation, result: Analysis) -> list[str]:
    """The demo's report: the per-tick table, the failovers and the verdict, as lines."""
    t0 = obs.first_tick
    lines = [f"{'#':>3}  {'due (UTC)':12}  {'ran +s':>6}  {'sent by':7}  {'ran on':15}  {'runs':>4}  {'skipped':>7}  note"]
    for n, row in enumerate(result.rows, 1):
        lines.append(
            f"{n:>3}  {_clock(row.due):12}  {row.ran - t0:>6.1f}  {row.beat:7}  {','.join(row.workers):15}  "
            f"{row.runs:>4}  {row.skipped:>7}  {row.note}".rstrip()
        )
    lines.append(COLUMNS)
    lines.append("")
    lines.append(f"failovers ({len(obs.failovers)}), times from the signal:")
    for f in obs.failovers:
        takeover = f"{f.new} elected after {f.takeover - f.at:.2f} s" if f.takeover else "no new leader elected"
        lines.append(f"  {f.at - t0:>5.1f} s  {f.signal} {f.old}: {takeover}, {_first_tick(f, result)}")
    lines.append("")
    runs = sum(r.runs for r in result.rows)
    lines.append(
        f"ticks: {len(result.rows)} ids, {runs} runs in {obs.ended - t0:.1f} s; duplicates: {len(result.duplicates)}; "
        f"missed: {result.missed_count}; collapsed into catch-up runs: {result.collapsed}; "
        f"copies skipped by the workers: {sum(r.skipped for r in result.rows)}"
    )
    for n, why in result.missed:
        lines.append(f"  missed {n}: {why}")
    for t in result.duplicates:
        lines.append(f"  duplicate: {t}")
    for record in result.malformed:
        lines.append(f"  a run without a tick id: {record}")
    lines.append(
        "  (missed = a due time no run covered. After a failover Celery sends the ticks that fell due\n"
        "   while nobody led as ONE late catch-up run, the first of them; those are 'collapsed', and\n"
        f"   count as missed only if the catch-up comes later than the failover bound + {FIRST_SEND:g} s\n"
        f"   + {LATENESS:g} s.)"
    )
    return lines
