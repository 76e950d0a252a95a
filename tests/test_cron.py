"""`celery-consul-lock run`: the cron job on every node, run once per slot across the cluster.

Every scenario runs the real console script as child processes ("nodes") against the dev
agent, on a key of its own. The wrappers read a fake clock (CELERY_CONSUL_LOCK_RUN_NOW: what
their clock reads when they start), so the slot does not depend on when the test runs and
"nodes" can be skewed; Consul is never faked. Their job is a shell command that appends a
line to a file per run, so a test can count who ran a slot.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from celery import Celery

from celery_consul_lock import TICK_HEADER, ConsulLock, ConsulLockedTask, ConsulSettings, Tick, is_skipped
from celery_consul_lock.consul import ConsulClient
from celery_consul_lock.cron import (
    EXIT_BAD_ARGUMENTS,
    EXIT_LOCK_LOST,
    EXIT_SKIPPED,
    EXIT_UNAVAILABLE,
    NOW_ENV,
    CronSchedule,
    EverySchedule,
    main,
    parse_args,
    slot_of,
)
from celery_consul_lock.protocol import crontab_tick
from celery_consul_lock.testing import Proc, spawn
from celery_consul_lock.ticks import read_mark

from .servers import ConsulAgent, free_port, start_consul, wait_consul_ready, wait_for
from .test_interop import _consul_lock, _curl

WRAPPER = str(Path(sys.executable).parent / "celery-consul-lock")
#: The wrappers' fake clock: 5 s into the 10:00 slot of "* * * * *".
NOW = "2026-11-30T10:00:05Z"
SLOT = "2026-11-30T10:00:00Z"
#: Short sessions so that a dead wrapper's lock frees fast: its health check's TTL is 2 s
#: (CHECK_TTL_MIN), then the 2 s lock-delay.
LOCKING = ["--cron", "* * * * *", "--ttl", "20", "--lock-delay", "2"]
#: A SIGKILLed wrapper's lock is takeable again within check TTL + lock-delay (4 s); the rest
#: is room for a loaded 2-core machine (the waiting wrapper may take seconds to start there).
#: Ended by its TTL alone, the session would hold the key 20 s at least.
KILLED_FREE_BOUND = 12.0


@dataclass
class Node(Proc):
    """One wrapper process (:func:`celery_consul_lock.testing.spawn`), its output in ``log``."""

    def wait(self, timeout: float | None = 30) -> int:
        return super().wait(timeout)

    @property
    def stderr(self) -> str:
        return self.log_text()

    def lines(self) -> list[str]:
        """The wrapper's own decision lines (the command's output is in the same file)."""
        return [line for line in self.stderr.splitlines() if line.startswith("celery-consul-lock run:")]


@dataclass
class Job:
    """Where a test's command records its runs, and the key and entry it runs under."""

    dir: Path
    prefix: str

    @property
    def key(self) -> str:
        return self.prefix + "/.lock"

    @property
    def entry(self) -> str:
        return self.prefix.removeprefix("locks/")

    @property
    def runs_file(self) -> Path:
        return self.dir / "runs"

    def runs(self) -> list[dict[str, str]]:
        """One dict per run of the command: node, slot, fencing token, its pid."""
        if not self.runs_file.exists():
            return []
        fields = ("node", "slot", "token", "pid")
        return [dict(zip(fields, line.split(), strict=True)) for line in self.runs_file.read_text().splitlines()]

    def kill_leftovers(self) -> None:
        """SIGKILL what is left of this test's commands (a failed test may leave a stubborn
        one): the processes whose command line names this job's runs file."""
        marker = str(self.runs_file).encode()
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with suppress(OSError):
                if marker in cmdline.read_bytes():
                    os.kill(int(cmdline.parent.name), signal.SIGKILL)

    def command(self, then: str = "exit 0") -> list[str]:
        """sh -c: record the run (one line), then ``then``."""
        record = f'echo "$NODE $CELERY_CONSUL_LOCK_SLOT $CELERY_CONSUL_LOCK_FENCING_TOKEN $$" >> {self.runs_file}'
        return ["sh", "-c", f"{record}; {then}"]


@pytest.fixture
def job(key: str, tmp_path: Path) -> Iterator[Job]:
    j = Job(tmp_path, key.removesuffix("/.lock"))
    yield j
    j.kill_leftovers()


@pytest.fixture
def node(consul: ConsulAgent, tmp_path: Path) -> Iterator:
    """``node(name, args, command, now=NOW, env={...})`` starts a wrapper; all are
    killed (with their process groups) at the test's end."""
    started: list[Node] = []

    def start(name: str, args: list[str], command: list[str], *, now: str = NOW, env: dict | None = None) -> Node:
        log = tmp_path / f"{name}-{len(started)}.log"
        environ = {**os.environ, "CONSUL_HTTP_ADDR": consul.address, NOW_ENV: now, "NODE": name, **(env or {})}
        started.append(spawn(name, [WRAPPER, "run", *args, "--", *command], tmp_path, env=environ, log=log, kind=Node))
        return started[-1]

    yield start
    for n in started:
        n.kill()  # SIGKILL of its process group, and reaped


def _settings(consul: ConsulAgent) -> ConsulSettings:
    return ConsulSettings(address=consul.address, lock_delay=2.0)


def _kv(consul: ConsulAgent, key: str) -> dict | None:
    data = consul.api(f"/v1/kv/{key}?consistent")
    return data[0] if data else None


def _session_of(consul: ConsulAgent, key: str) -> str | None:
    try:
        entry = _kv(consul, key)
    except OSError:  # 404: no key yet
        return None
    return entry.get("Session") if entry else None


def _completed(consul: ConsulAgent, job: Job, due: str = SLOT) -> bool:
    """True if the entry's mark says the slot ran to completion."""
    settings = _settings(consul)
    client = ConsulClient(settings)
    try:
        mark = read_mark(client, settings, job.entry)
    finally:
        client.close()
    return mark.covers(Tick.parse(f"{job.entry}@{due}"))


def _alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie waiting for its reaper does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _group_alive(pgid: int) -> bool:
    """True if any process of the process group ``pgid`` runs."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError):
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def _started(path: Path) -> int:
    """Wait for a command to write its pid into ``path``; returns it."""
    wait_for(lambda: path.exists() and path.read_text().strip(), 20, f"the command to start ({path.name})")
    return int(path.read_text().strip())


# -- the slot: pure logic ----------------------------------------------------------------------


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.mark.parametrize(
    ("now", "due", "early"),
    [
        ("2026-11-30T03:00:00Z", "2026-11-30T03:00:00Z", 0.0),  # on time
        ("2026-11-30T03:00:04Z", "2026-11-30T03:00:00Z", 0.0),  # a few seconds late
        ("2026-11-30T14:00:00Z", "2026-11-30T03:00:00Z", 0.0),  # hours late: a retry by hand
        ("2026-11-30T02:59:58Z", "2026-11-30T03:00:00Z", 2.0),  # a clock behind: the coming slot
        ("2026-11-30T02:59:29Z", "2026-11-29T03:00:00Z", 0.0),  # earlier than the tolerance: the last one
    ],
)
def test_cron_slot_is_the_due_time_with_early_tolerance_and_any_lateness(now: str, due: str, early: float) -> None:
    slot = slot_of(CronSchedule("0 3 * * *", tz=timezone.utc), _at(now), tolerance=30)
    assert (slot.due, slot.early) == (_at(due), early)
    # The window ends where the next slot's begins: its due time less the tolerance.
    assert slot.window_end == _at(due) + timedelta(days=1, seconds=-30)


@pytest.mark.parametrize(
    ("nickname", "same_as"),
    [("@hourly", "0 * * * *"), ("@daily", "0 0 * * *"), ("@midnight", "0 0 * * *"), ("@weekly", "0 0 * * 0"),
     ("@monthly", "0 0 1 * *"), ("@yearly", "0 0 1 1 *"), ("@annually", "0 0 1 1 *")],
)  # fmt: skip
def test_cron_nicknames_are_taken_as_cron_takes_them(nickname: str, same_as: str) -> None:
    now = _at("2026-11-30T12:34:56Z")
    mine, theirs = CronSchedule(nickname, tz=timezone.utc), CronSchedule(same_as, tz=timezone.utc)
    assert slot_of(mine, now) == slot_of(theirs, now)
    assert mine.next(now) == theirs.next(now) and mine.next(now) > now


def test_every_slots_align_on_the_epoch_and_early_is_at_most_a_quarter_of_the_period() -> None:
    every = EverySchedule(10)
    # Up to a quarter of the period early, whatever the tolerance; late for the rest of it.
    assert slot_of(every, _at("2026-11-30T03:00:07.400Z"), tolerance=30).due == _at("2026-11-30T03:00:00Z")
    assert slot_of(every, _at("2026-11-30T03:00:07.600Z"), tolerance=30).due == _at("2026-11-30T03:00:10Z")
    assert slot_of(every, _at("2026-11-30T03:00:08Z"), tolerance=1).due == _at("2026-11-30T03:00:00Z")


def test_cron_slots_across_daylight_saving_time_changes() -> None:
    berlin = CronSchedule("30 2 * * *", tz=ZoneInfo("Europe/Berlin"))
    # Clocks go forward at 02:00 CET: 02:30 does not exist that day; the slot is at 03:00 CEST.
    assert slot_of(berlin, _at("2026-03-29T01:05:00Z")).due == _at("2026-03-29T01:00:00Z")
    # Clocks go back at 03:00 CEST: 02:30 happens twice, and each is a slot of its own.
    assert slot_of(berlin, _at("2026-10-25T00:31:00Z")).due == _at("2026-10-25T00:30:00Z")
    assert slot_of(berlin, _at("2026-10-25T01:31:00Z")).due == _at("2026-10-25T01:30:00Z")
    # An hourly job that night: the gap between the two 02:30s is an hour of real time (zero on
    # the wall clock), so an invocation 5 s early still belongs to the second.
    hourly = CronSchedule("30 * * * *", tz=ZoneInfo("Europe/Berlin"))
    slot = slot_of(hourly, _at("2026-10-25T01:29:55Z"))
    assert (slot.due, slot.early) == (_at("2026-10-25T01:30:00Z"), 5.0)


def test_cron_reads_day_of_month_or_day_of_week_as_cron_does() -> None:
    # "the 1st, or any Monday": 2026-11-30 is a Monday, not the 1st.
    slot = slot_of(CronSchedule("0 3 1 * 1", tz=timezone.utc), _at("2026-11-30T03:00:01Z"))
    assert slot.due == _at("2026-11-30T03:00:00Z")


def test_the_key_and_the_entry_default_to_the_command_and_follow_consul_lock_layout(monkeypatch) -> None:
    monkeypatch.delenv("CONSUL_HTTP_ADDR", raising=False)
    for args, key, entry in [
        (["--", "/bin/true"], "locks/true/.lock", "true"),
        (["--key", "locks/backup", "--", "true"], "locks/backup/.lock", "backup"),
        (["--key", "locks/backup/.lock", "--", "true"], "locks/backup/.lock", "backup"),
        (["--key", "jobs/nightly", "--entry", "nightly-backup", "--", "true"], "jobs/nightly/.lock", "nightly-backup"),
    ]:
        options, _ = parse_args(["--every", "60", *args])
        assert (options.key, options.entry, options.command[0]) == (key, entry, args[-1])


# -- one run per slot -------------------------------------------------------------------------


def test_three_nodes_at_once_one_runs_two_skip_and_a_late_fourth_skips(node, job: Job, consul: ConsulAgent) -> None:
    nodes = [node(name, ["--key", job.prefix, *LOCKING], job.command("sleep 1.5")) for name in ("a", "b", "c")]
    statuses = sorted(n.wait() for n in nodes)
    runs = job.runs()
    assert statuses == [0, EXIT_SKIPPED, EXIT_SKIPPED], [n.stderr for n in nodes]
    assert len(runs) == 1, runs
    assert runs[0]["slot"] == f"{job.entry}@{SLOT}" and int(runs[0]["token"]) > 0
    for n in nodes:
        lines = n.lines()
        assert lines and all(f"key {job.key}, slot {job.entry}@{SLOT}" in line and "holder: " in line for line in lines), lines
        if n.returncode == EXIT_SKIPPED:
            assert len(lines) == 1 and "skipped" in lines[0], lines
    assert _completed(consul, job)

    # A node whose cron fired 20 s late, after the run finished: the usual script's hole.
    # Two at once, each waiting while the other looks at the mark.
    late = node("d", ["--key", job.prefix, *LOCKING, "--on-held", "wait"], job.command(), now="2026-11-30T10:00:20Z")
    args = ["--key", job.prefix, *LOCKING, "--on-held", "wait", "--skip-ok", "--quiet"]
    quiet = node("e", args, job.command(), now="2026-11-30T10:00:25Z")
    assert late.wait() == EXIT_SKIPPED
    assert "already ran to completion" in late.lines()[-1] and f"{job.entry}@{SLOT}" in late.lines()[-1], late.stderr
    assert quiet.wait() == 0 and quiet.lines() == []
    assert len(job.runs()) == 1


def test_nodes_skewed_by_seconds_agree_on_the_slot(node, job: Job, consul: ConsulAgent) -> None:
    # The same moment on three clocks: 2.5 s behind, on time, 2.5 s ahead.
    clocks = {"slow": "2026-11-30T09:59:57.500Z", "exact": "2026-11-30T10:00:00Z", "fast": "2026-11-30T10:00:02.500Z"}
    args = ["--key", job.prefix, *LOCKING, "--on-held", "wait"]
    nodes = [node(name, args, job.command("sleep 1"), now=now) for name, now in clocks.items()]
    statuses = sorted(n.wait() for n in nodes)
    assert statuses == [0, EXIT_SKIPPED, EXIT_SKIPPED], [n.stderr for n in nodes]
    assert [r["slot"] for r in job.runs()] == [f"{job.entry}@{SLOT}"]
    for n in nodes:
        assert all(f"slot {job.entry}@{SLOT}" in line for line in n.lines()), n.stderr
    # A node whose clock is more than the tolerance behind belongs to the previous slot; one
    # within it, to the coming one, and says so.
    waiting = ["--key", job.prefix, *LOCKING, "--on-held", "wait"]
    stale = node("stale", [*waiting, "--tolerance", "2"], job.command(), now="2026-11-30T09:59:57.500Z")
    early = node("early", waiting, job.command(), now="2026-11-30T10:00:57.500Z")
    assert stale.wait() == 0 and early.wait() == 0, stale.stderr + early.stderr
    assert sorted(r["slot"] for r in job.runs()[1:]) == [f"{job.entry}@2026-11-30T09:59:00Z", f"{job.entry}@2026-11-30T10:01:00Z"]
    assert "running the command (2.5 s before the slot's due time, within the tolerance)" in early.stderr, early.stderr


def test_a_failing_command_leaves_the_slot_open_and_a_waiting_node_or_a_retry_runs_it(node, job: Job, consul) -> None:
    first = node("a", ["--key", job.prefix, *LOCKING], job.command("sleep 1; exit 3"))
    wait_for(job.runs_file.exists, 20, "the first node's command to start")
    waiting = node("b", ["--key", job.prefix, *LOCKING, "--on-held", "wait"], job.command("exit 4"))
    assert first.wait() == 3, first.stderr
    assert "failed with status 3; slot not recorded" in first.lines()[-1]
    # The waiting node took the lock after the failure and ran the slot (and failed too).
    assert waiting.wait() == 4, waiting.stderr
    assert not _completed(consul, job)
    retry = node("c", ["--key", job.prefix, *LOCKING], job.command(), now="2026-11-30T10:00:25Z")
    assert retry.wait() == 0, retry.stderr
    assert [r["node"] for r in job.runs()] == ["a", "b", "c"]
    assert _completed(consul, job)


# -- death, loss and signals ---------------------------------------------------------------------


def test_a_wrapper_killed_mid_run_frees_the_lock_within_the_bound_and_the_slot_runs_again(node, job: Job, consul) -> None:
    pidfile = job.dir / "pid"
    victim = node("a", ["--key", job.prefix, *LOCKING], job.command(f"echo $$ > {pidfile}; exec sleep 60"))
    command = _started(pidfile)
    victim.signal(signal.SIGKILL)  # the wrapper alone: its command is left to the kernel
    killed = time.monotonic()
    assert not _completed(consul, job)
    later = node("b", ["--key", job.prefix, *LOCKING, "--on-held", "wait"], job.command(), now="2026-11-30T10:00:25Z")
    victim.wait()
    wait_for(lambda: not _alive(command), 5, "the command to get SIGTERM when its wrapper died (PR_SET_PDEATHSIG)")
    wait_for(lambda: len(job.runs()) == 2 or not later.alive(), 30, "the waiting node's command to start")
    took = time.monotonic() - killed
    assert [r["node"] for r in job.runs()] == ["a", "b"], later.stderr
    assert took < KILLED_FREE_BOUND, f"the killed wrapper's lock took {took:.1f} s to be taken again"
    assert later.wait() == 0, later.stderr
    assert _completed(consul, job)


def test_the_lock_taken_away_mid_run_stops_the_command_with_sigterm_then_sigkill(node, job: Job, consul) -> None:
    pidfile, terms = job.dir / "pid", job.dir / "terms"
    # The command ends at SIGTERM, but leaves a process in its group that ignores it: only
    # SIGKILL, after the grace, stops that one.
    stubborn = "(trap '' TERM; while :; do sleep 0.2; done) &"
    obliging = f"trap 'echo TERM >> {terms}; exit 0' TERM; echo $$ > {pidfile}; wait"
    victim = node("a", ["--key", job.prefix, *LOCKING, "--kill-grace", "1"], job.command(f"{stubborn} {obliging}"))
    command = _started(pidfile)
    sid = _session_of(consul, job.key)
    assert sid
    consul.api(f"/v1/session/destroy/{sid}", "PUT")
    taken = time.monotonic()
    assert victim.wait(15) == EXIT_LOCK_LOST, victim.stderr
    assert time.monotonic() - taken >= 1, "the wrapper did not give the command's group its grace"
    assert terms.read_text().split() == ["TERM"]
    assert any("lock lost" in line and "SIGKILL after 1 s" in line for line in victim.lines()), victim.stderr
    wait_for(lambda: not _group_alive(command), 5, "the command's process group to be gone")
    assert not _completed(consul, job)


def test_sigterm_and_sigint_go_to_the_command_and_the_lock_is_released_after_it(node, job: Job, consul) -> None:
    wrappers = {}
    for signum in (signal.SIGTERM, signal.SIGINT):  # at once, on keys of their own
        prefix, pidfile = f"{job.prefix}-{signum.name}", job.dir / f"pid-{signum.name}"
        wrapper = node(signum.name, ["--key", prefix, *LOCKING], job.command(f"echo $$ > {pidfile}; exec sleep 60"))
        wrappers[signum] = (prefix, pidfile, wrapper)
    for signum, (prefix, pidfile, wrapper) in wrappers.items():
        command = _started(pidfile)
        wrapper.signal(signum)
        assert wrapper.wait() == 128 + signum, wrapper.stderr
        assert f"failed with status {128 + signum} after {signum.name} was passed on to it" in wrapper.lines()[-1]
        assert not _alive(command)
        # Released, not dropped: no lock-delay for the next holder.
        lock = ConsulLock(f"{prefix}/.lock", settings=_settings(consul))
        assert lock.acquire(blocking=False), _kv(consul, f"{prefix}/.lock")
        lock.release()
        assert not _completed(consul, Job(job.dir, prefix))


def test_consul_unreachable_before_the_run_exits_69_and_during_it_stops_the_command_75(node, job: Job, tmp_path: Path) -> None:
    agent = start_consul(tmp_path / "own-agent", node="cron-cut-off")
    try:
        wait_consul_ready(agent)
        unreachable = node(
            "a", ["--key", job.prefix, *LOCKING], job.command(), env={"CONSUL_HTTP_ADDR": f"127.0.0.1:{free_port()}"}
        )
        pidfile, terms = job.dir / "pid", job.dir / "terms"
        obliging = f"trap 'echo TERM >> {terms}; exit 0' TERM; echo $$ > {pidfile}; while :; do sleep 0.2; done"
        cut_off = node("b", ["--key", job.prefix, *LOCKING], job.command(obliging), env={"CONSUL_HTTP_ADDR": agent.address})
        _started(pidfile)
        agent.proc.signal(signal.SIGKILL)  # the node's agent dies: no renewal gets through
        lost = time.monotonic()
        assert cut_off.wait(20) == EXIT_LOCK_LOST, cut_off.stderr
        # The fencing window is min(TTL, lock-delay) = 2 s; the command stopped within it plus room.
        assert terms.read_text().split() == ["TERM"] and time.monotonic() - lost < 8, cut_off.stderr
        assert any("lock lost" in line and "no successful renewal" in line for line in cut_off.lines()), cut_off.stderr
    finally:
        agent.stop()
    assert unreachable.wait() == EXIT_UNAVAILABLE
    assert "Consul unavailable" in unreachable.lines()[0] and "unreachable" in unreachable.lines()[0], unreachable.stderr
    # The wrapper has no Celery settings: the message names the variable it reads.
    assert "point CONSUL_HTTP_ADDR at it" in unreachable.lines()[0], unreachable.stderr
    assert "consul_lock_address" not in unreachable.stderr, unreachable.stderr
    assert [r["node"] for r in job.runs()] == ["b"]


# -- the other tools on the same key -----------------------------------------------------------


def test_consul_lock_and_the_wrapper_exclude_each_other(node, job: Job, consul: ConsulAgent, tmp_path: Path) -> None:
    # Both ways at once, on two keys: `consul lock` holds one, a wrapper the other.
    cli_holds, run_holds = f"{job.prefix}-cli", f"{job.prefix}-run"
    started, pidfile, touched = tmp_path / "cli-started", job.dir / "pid", tmp_path / "cli-ran"
    cli = spawn("cli", _consul_lock(consul, cli_holds, f"touch {started}; exec sleep 60"), tmp_path)
    refused: Proc | None = None
    running = node("b", ["--key", run_holds, *LOCKING], job.command(f"echo $$ > {pidfile}; sleep 2.5"))
    try:
        wait_for(started.exists, 20, "`consul lock`'s child to start")
        skipped = node("a", ["--key", cli_holds, *LOCKING], job.command())
        _started(pidfile)
        refused = spawn("cli-refused", _consul_lock(consul, run_holds, f"touch {touched}", "-timeout=1s"), tmp_path)
        assert refused.wait(30) != 0 and not touched.exists(), refused.log_text()
        assert skipped.wait() == EXIT_SKIPPED
        assert "held by another holder" in skipped.lines()[0] and "Consul lock" in skipped.lines()[0], skipped.stderr
    finally:
        cli.stop(timeout=15)  # SIGTERM: `consul lock` stops its child and releases
        if refused is not None:
            refused.kill()
    assert running.wait() == 0, running.stderr
    assert [r["node"] for r in job.runs()] == ["b"]


def test_the_usual_curl_script_and_the_wrapper_exclude_each_other(node, job: Job, consul: ConsulAgent) -> None:
    # Both ways at once, on two keys: the script holds one, a wrapper the other.
    script_holds, run_holds = f"{job.prefix}-script", f"{job.prefix}-run"
    base, pidfile = consul.url, job.dir / "pid"
    script = json.loads(_curl("-X", "PUT", "--data-binary", '{"Name": "backup cron", "TTL": "15s"}', f"{base}/v1/session/create"))
    sid = script["ID"]

    def acquire(prefix: str) -> str:
        return _curl("-X", "PUT", "--data-binary", "backup by cron", f"{base}/v1/kv/{prefix}/.lock?acquire={sid}")

    try:
        assert acquire(script_holds) == "true"
        skipped = node("a", ["--key", script_holds, *LOCKING], job.command())
        running = node("b", ["--key", run_holds, *LOCKING], job.command(f"echo $$ > {pidfile}; sleep 1.5"))
        _started(pidfile)
        assert acquire(run_holds) == "false"
        assert skipped.wait() == EXIT_SKIPPED
        assert "held by another holder" in skipped.lines()[0] and "backup cron" in skipped.lines()[0], skipped.stderr
        assert running.wait() == 0, running.stderr
    finally:
        _curl("-X", "PUT", f"{base}/v1/session/destroy/{sid}")
    assert [r["node"] for r in job.runs()] == ["b"]


@pytest.fixture
def locked_task(consul: ConsulAgent):
    """A ConsulLockedTask guarding a job whose lock key is its argument, run in this process."""
    app = Celery("cron-interop", set_as_current=False)
    # eager="consul": apply() runs in this process, and eager calls bypass the lock by default.
    consul.configure(app, lock_delay=2, ttl=10)

    @app.task(base=ConsulLockedTask, lock_key="{key}", bind=True, shared=False)
    def backup(self, key):
        return {"ran": True, "token": self.fencing_token}

    return backup


def test_a_consul_locked_task_and_the_wrapper_share_the_lock_and_the_slots(node, job: Job, consul, locked_task) -> None:
    # Three cases at once, on keys of their own (entry = the key's job name).
    done_by_task, done_by_run, held_by_run = (f"{job.prefix}-{n}" for n in (1, 2, 3))

    def task(prefix: str, fired: str | None = None) -> dict:
        """Run the task as a beat's crontab entry named after the job sends it at ``fired``."""
        tick = crontab_tick(prefix.removeprefix("locks/"), _at(fired)) if fired else None
        headers = {TICK_HEADER: str(tick)} if tick else {}
        return locked_task.apply(kwargs={"key": f"{prefix}/.lock"}, headers=headers).get()

    # The task runs the 10:00 tick (fired 0.4 s into the minute): the wrapper's slot is done.
    assert task(done_by_task, "2026-11-30T10:00:00.400Z")["ran"]
    late = node("a", ["--key", done_by_task, *LOCKING], job.command())
    # The wrapper runs the 10:01 slot: the task's copy of that tick is skipped.
    ran = node("b", ["--key", done_by_run, *LOCKING], job.command(), now="2026-11-30T10:01:02Z")
    # While a wrapper runs, the task finds the key held.
    pidfile = job.dir / "pid"
    running = node("c", ["--key", held_by_run, *LOCKING], job.command(f"echo $$ > {pidfile}; sleep 1.5"))

    _started(pidfile)
    held = task(held_by_run)
    assert is_skipped(held) and held["reason"] == "held" and "celery-consul-lock run" in held["holder"], held
    assert running.wait() == 0, running.stderr
    assert ran.wait() == 0, ran.stderr
    skipped = task(done_by_run, "2026-11-30T10:01:00.400Z")
    assert is_skipped(skipped) and skipped["reason"] == "duplicate-tick", skipped
    assert late.wait() == EXIT_SKIPPED
    assert "already ran to completion" in late.lines()[0] and "Celery task" in late.lines()[0], late.stderr
    assert sorted(r["node"] for r in job.runs()) == ["b", "c"]


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (
            ["--cron", "61 * * * *", "--", "true"],
            EXIT_BAD_ARGUMENTS,
            "--cron='61 * * * *' is invalid: the minute field '61' is not acceptable (values 0-59); croniter: ",
        ),
        (
            ["--cron", "0 25 * * *", "--", "true"],
            EXIT_BAD_ARGUMENTS,
            "--cron='0 25 * * *' is invalid: the hour field '25' is not acceptable (values 0-23); croniter: ",
        ),
        (["--cron", "0 3 * * 8", "--", "true"], EXIT_BAD_ARGUMENTS, "the day of week field '8' is not acceptable"),
        (["--cron", "0 3 * JANX *", "--", "true"], EXIT_BAD_ARGUMENTS, "the month field 'JANX' is not acceptable"),
        (["--cron", "*/0 * * * *", "--", "true"], EXIT_BAD_ARGUMENTS, "the minute field '*/0' is not acceptable"),
        (["--cron", "* * *", "--", "true"], EXIT_BAD_ARGUMENTS, "--cron='* * *' is invalid: 3 fields given; expected five"),
        (["--cron", "0 3 * * * *", "--", "true"], EXIT_BAD_ARGUMENTS, "--cron='0 3 * * * *' is invalid: 6 fields given"),
        (["--cron", "bad", "--", "true"], EXIT_BAD_ARGUMENTS, "--cron='bad' is invalid: 1 field given; expected five"),
        (["--cron", "@reboot", "--", "true"], EXIT_BAD_ARGUMENTS, "--cron='@reboot' is invalid: @reboot has no slots"),
        (["--cron", "@often", "--", "true"], EXIT_BAD_ARGUMENTS, "--cron='@often' is invalid: @often is not a cron nickname"),
        (["--every", "0", "--", "true"], EXIT_BAD_ARGUMENTS, "--every='0' is invalid: expected seconds between slots"),
        (["--every", "0.5s", "--", "true"], EXIT_BAD_ARGUMENTS, "--every='0.5s' is invalid: expected seconds between slots"),
        (["--every", "soon", "--", "true"], EXIT_BAD_ARGUMENTS, "--every='soon' is invalid"),
        (["--every", "60", "--"], EXIT_BAD_ARGUMENTS, "no command given"),
        (["--every", "60"], EXIT_BAD_ARGUMENTS, "no command given"),
        (["--", "true"], EXIT_BAD_ARGUMENTS, "one of the arguments --cron --every is required"),
        (["--cron", "* * * * *", "--every", "60", "--", "true"], EXIT_BAD_ARGUMENTS, "not allowed with argument"),
        (["--every", "60", "--key", "locks/my job", "--", "true"], EXIT_BAD_ARGUMENTS, "--key='locks/my job' is invalid"),
        (["--every", "60", "--key", "locks/../x", "--", "true"], EXIT_BAD_ARGUMENTS, "--key='locks/../x' is invalid"),
        (["--every", "60", "--key", "/locks/x", "--", "true"], EXIT_BAD_ARGUMENTS, "--key='/locks/x' is invalid"),
        (["--every", "60", "--ttl", "5", "--", "true"], EXIT_BAD_ARGUMENTS, "--ttl='5' is invalid"),
        (["--every", "60", "--lock-delay", "61", "--", "true"], EXIT_BAD_ARGUMENTS, "--lock-delay='61' is invalid"),
        (["--every", "60", "--on-held", "retry", "--", "true"], EXIT_BAD_ARGUMENTS, "invalid choice: 'retry'"),
        (["--every", "60", "--", "/nonexistent/backup"], 127, "'/nonexistent/backup' is not found"),
        (["--every", "60", "--", "{here}"], 126, "is not executable"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message_and_nothing_taken(
    args, status, message, consul: ConsulAgent, monkeypatch, capsys, tmp_path: Path
) -> None:
    plain = tmp_path / "not-executable"
    plain.write_text("echo hi\n")
    monkeypatch.setenv("CONSUL_HTTP_ADDR", consul.address)
    sessions, services = consul.api("/v1/session/list"), consul.api("/v1/agent/services")
    assert main(["run", *[a.replace("{here}", str(plain)) for a in args]]) == status
    err = capsys.readouterr().err
    assert err.startswith("celery-consul-lock run: refused, nothing taken: ") and message in err, err
    assert consul.api("/v1/session/list") == sessions and consul.api("/v1/agent/services") == services


def test_a_command_gone_when_its_turn_comes_is_reported_and_the_slot_stays_open(node, job: Job, consul) -> None:
    script, go, pidfile = job.dir / "backup.sh", job.dir / "go", job.dir / "pid"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    holder = node(
        "a", ["--key", job.prefix, *LOCKING], job.command(f"echo $$ > {pidfile}; until [ -e {go} ]; do sleep 0.1; done; exit 1")
    )
    _started(pidfile)
    waiter = node("b", ["--key", job.prefix, *LOCKING, "--on-held", "wait"], [str(script)])
    wait_for(lambda: any("waiting up to" in line for line in waiter.lines()), 30, "the second node to wait for the lock")
    script.unlink()  # checked when the wrapper started; gone when the lock comes
    go.touch()
    assert holder.wait() == 1, holder.stderr
    assert waiter.wait() == 127, waiter.stderr
    assert "the command could not be started: No such file or directory" in waiter.lines()[-1], waiter.stderr
    assert not _completed(consul, job)


def test_bad_environment_is_refused_by_the_console_script(node, job: Job) -> None:
    refused = {
        "CONSUL_HTTP_ADDR='no-port' is invalid": node(
            "a", ["--key", job.prefix, *LOCKING], job.command(), env={"CONSUL_HTTP_ADDR": "no-port"}
        ),
        f"{NOW_ENV}='tomorrow' is invalid": node("b", ["--key", job.prefix, *LOCKING], job.command(), env={NOW_ENV: "tomorrow"}),
    }
    for message, wrapper in refused.items():
        assert wrapper.wait() == EXIT_BAD_ARGUMENTS
        assert message in wrapper.stderr and "refused, nothing taken" in wrapper.stderr, wrapper.stderr
    assert job.runs() == []
