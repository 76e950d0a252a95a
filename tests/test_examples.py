"""The example projects (example_project/django_site, example_project/flask_app), run for real.

Each scenario starts real `celery worker` and `celery beat` processes of one example, with the
example's leader-elected scheduler, against the session's Consul agent and Redis (a Redis
database of its own), kills the leading beat with SIGKILL, and judges the heartbeat runs with
the same code as `make demo` (example_project.cluster / .analysis): each tick id ran once, and
no due time went uncovered beyond the failover bound.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timezone

import pytest

from celery_consul_lock import Tick
from example_project.analysis import LATENESS, analyse, describe
from example_project.cluster import (
    CRASH_BOUND,
    EXAMPLES,
    FIRST_SEND,
    TERM_BOUND,
    Failover,
    Observation,
    example_cluster,
    run_scenario,
)

from .servers import ROOT

#: A short run: about 4 s of the first leader, the crash failover, then the new leader.
DURATION = 12.0
KILL_AT = 0.35


def test_django_example_passes_manage_py_check(tmp_path):
    example = EXAMPLES["django"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "CELERY_"))}
    env.update(PYTHONPATH=str(ROOT), DJANGO_DB_PATH=str(tmp_path / "db.sqlite3"))
    proc = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=example.project_dir, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "System check identified no issues" in proc.stdout


@pytest.mark.parametrize(("name", "db"), [("django", 7), ("flask", 8)])
def test_example_runs_each_tick_once_through_a_leader_crash(name, db, consul, redis_server, tmp_path):
    redis_url = f"{redis_server.url.rpartition('/')[0]}/{db}"
    with example_cluster(EXAMPLES[name], consul.address, redis_url, tmp_path) as cluster:
        obs = run_scenario(cluster, beats=2, workers=1, duration=DURATION, plan=[(KILL_AT, signal.SIGKILL)])
    result = analyse(obs)
    report = "\n".join(describe(obs, result))
    print(report)  # shown when the test fails

    # The leader was killed, and the other beat took over within the crash bound.
    (failover,) = obs.failovers
    assert failover.new is not None and failover.new != failover.old, report
    assert failover.first_tick is not None and failover.first_tick - failover.at <= CRASH_BOUND + FIRST_SEND + LATENESS, report
    # Before the kill only the first leader sent; after it (a message in flight aside) only the new one.
    assert {r["beat"] for r in obs.runs if r["t"] < failover.at} == {failover.old}, report
    assert {r["beat"] for r in obs.runs if r["t"] > failover.at + 0.5} == {failover.new}, report
    # Each tick id ran once; no due time was passed over; the run covered the whole time.
    ids = [r["tick"] for r in obs.runs]
    assert all(ids) and len(ids) == len(set(ids)), report
    assert not result.duplicates and not result.missed and result.ok, report
    # No tick was even sent twice (the workers skipped no copy): a new leader neither
    # resends what the old one sent nor sends its first tick twice.
    assert not obs.skips, report
    assert len(result.rows) >= DURATION / obs.interval - 2, report
    if name == "flask":  # LockedFlaskTask ran the body inside the Flask app context
        assert {r.get("app") for r in obs.runs} == {"backup_app"}, report


def _observation(runs: list[tuple[float, float, str]], failovers: list[Failover] = (), ended: float = 10.5) -> Observation:
    """A made-up observation: runs as (due, ran, beat), one worker, interval 2 s, from t=0."""
    base = 1_800_000_000.0
    records = [
        {"tick": str(Tick.of("heartbeat", datetime.fromtimestamp(base + due, timezone.utc))), "t": base + ran, "beat": beat,
         "worker": "worker1"}
        for due, ran, beat in runs
    ]  # fmt: skip
    return Observation(
        example=EXAMPLES["flask"],
        started=base,
        first_tick=base,
        ended=base + ended,
        interval=2.0,
        runs=records,
        skips=[],
        failovers=[
            replace(f, at=base + f.at, first_tick=None if f.first_tick is None else base + f.first_tick) for f in failovers
        ],
        leader_samples=[],
        beats=[],
        workers=[],
    )


def test_analysis_accepts_a_steady_chain_and_a_catch_up_within_the_bound():
    steady = _observation([(0, 0.01, "beat1"), (2.01, 2.02, "beat1"), (4.02, 4.03, "beat1"), (6.03, 6.04, "beat1")], ended=7)
    assert analyse(steady).ok
    # Killed at 4.5; beat2 leads at 8.2 and sends the catch-up of 6.03 (6.03 and 8.03 collapsed), then 10.2.
    crash = _observation(
        [(0, 0.01, "beat1"), (2.01, 2.02, "beat1"), (4.02, 4.03, "beat1"), (6.03, 8.2, "beat2"), (10.2, 10.21, "beat2")],
        [Failover(4.5, "SIGKILL", "beat1")],
        ended=11,
    )
    result = analyse(crash)
    assert result.ok and result.collapsed == 1, describe(crash, result)


def test_analysis_flags_a_tick_run_twice_a_second_chain_and_passed_over_due_times():
    twice = _observation([(0, 0.01, "beat1"), (0, 0.02, "beat1"), (2.01, 2.02, "beat1")], ended=3)
    assert analyse(twice).duplicates == [analyse(twice).rows[0].tick]
    second_chain = _observation([(0, 0.01, "beat1"), (1.0, 1.01, "beat2"), (2.01, 2.02, "beat1")], ended=3)
    assert len(analyse(second_chain).duplicates) == 1
    skipped = _observation([(0, 0.01, "beat1"), (6.01, 6.02, "beat1")], ended=7)  # 2.01 and 4.01 never sent
    assert analyse(skipped).missed_count == 2 and not analyse(skipped).ok
    late_catch_up = _observation(
        [(0, 0.01, "beat1"), (2.01, 12.0, "beat2")], [Failover(1.0, "SIGKILL", "beat1")], ended=13
    )  # the new leader's first tick came ~7 s past the crash bound
    assert analyse(late_catch_up).missed_count >= 1
    silent_end = _observation([(0, 0.01, "beat1"), (2.01, 2.02, "beat1")], ended=9)
    assert analyse(silent_end).missed_count == 2


def test_the_docs_quote_the_example_files_as_they_are():
    """Each code block of the README or a docs page that starts with ``# example_project/<file>``
    is a verbatim excerpt of that file."""
    quoted = set()
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for path, text in re.findall(r"```python\n# (example_project/\S+)\n(.*?)```", page.read_text(), re.S):
            quoted.add(path)
            assert text in (ROOT / path).read_text(), f"{page.relative_to(ROOT)}'s quote of {path} differs from the file"
    assert {"example_project/django_site/proj/settings.py", "example_project/flask_app/backup_app/__init__.py"} <= quoted


def test_the_report_explains_its_columns_and_a_first_tick_waiting_for_its_due_time_is_not_past_the_bound():
    # SIGTERM at 1.0 s (bound 1.0 s): beat2 leads at once, but the next tick is due at 2.02 s.
    waited = _observation(
        [(0, 0.01, "beat1"), (2.02, 2.05, "beat2")], [Failover(1.0, "SIGTERM", "beat1", "beat2", None, 2.05)], ended=3
    )
    result = analyse(waited)
    report = "\n".join(describe(waited, result))
    assert result.ok, report
    limit = TERM_BOUND + FIRST_SEND
    assert f"its first tick was due 1.02 s after the signal, after the bound ({limit:.2f} s), and ran 0.03 s after" in report
    assert "ran +s: when its first run started, in seconds from the" in report
    # A catch-up sent after the crash: judged against the bound, which the line names.
    killed = [Failover(1.0, "SIGKILL", "beat1", None, None, 4.5)]
    crash = _observation([(0, 0.01, "beat1"), (2.01, 4.5, "beat2")], killed, ended=5)
    crash_report = "\n".join(describe(crash, analyse(crash)))
    crash_line = f"its first tick ran after 3.50 s (bound {CRASH_BOUND:.2f} s to lead + {FIRST_SEND:g} s to its first send"
    assert crash_line in crash_report
