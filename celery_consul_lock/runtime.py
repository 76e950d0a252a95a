"""The leader's side of the runtime schedule (:mod:`.entries`): merges runtime entries into
the scheduler's schedule beside the config entries, wakes the scheduler loop when the schedule
changes, refuses a send that a pause, a disable or a removal forbids, sends run-now requests,
and disables a one-off entry once it has run.

Only :class:`~celery_consul_lock.beat.ConsulLeaderScheduler` uses it, through a few calls:
``sync`` on each leader tick, ``refusal`` before each send, ``after_send`` after one, and
``wait`` instead of Celery's sleep.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from .consul import shared_client
from .entries import NEVER, EntryDefinition, RunRequest, RuntimeSchedule, ScheduleSnapshot, ScheduleWatch, once
from .errors import ConsulLockError
from .protocol import Tick

__all__ = ["RuntimeEntries"]

log = logging.getLogger("celery_consul_lock.runtime")

#: The longest a leader's tick waits for a change of the runtime schedule (instead of
#: returning its sleep to Celery's beat service): a change wakes it at once, so this only
#: bounds how long one ``tick()`` call blocks for callers that are not the beat service
#: (tests, custom loops); a wake-up costs one look at the heap.
WAIT_MAX = 1.0


class RuntimeEntries:
    """The runtime schedule as one leading scheduler applies it.

    ``schedule``: the scheduler's entries by name (config entries already merged in);
    ``make_entry(**fields)``: builds one of the scheduler's entries; ``state_of(name)``: the
    stored (last_run_at, total_run_count, definition hash) of an entry, or None.
    """

    def __init__(
        self,
        store: RuntimeSchedule,
        schedule: dict[str, Any],
        make_entry: Callable[..., Any],
        state_of: Callable[[str], dict[str, Any] | None],
        definition_hash: Callable[[Any], str],
    ) -> None:
        self.store = store
        self.schedule = schedule
        self.make_entry = make_entry
        self.state_of = state_of
        self.definition_hash = definition_hash
        self.watch = ScheduleWatch(store)
        #: Names of entries from beat_schedule (set on the first sync): these win a clash.
        self.config_names: frozenset[str] = frozenset()
        #: Runtime entries now in the schedule, by name, as last applied.
        self.applied: dict[str, EntryDefinition] = {}
        #: Config entries disabled at runtime, kept aside to be put back on enable.
        self.parked: dict[str, Any] = {}
        self.snapshot: ScheduleSnapshot | None = None
        self._shadowed: set[str] = set()
        self._started = False
        #: A change was signalled but could not be read.
        self._stale = False

    @property
    def paused(self) -> bool:
        return self.snapshot is not None and self.snapshot.paused is not None

    def sync(self, *, force: bool = False) -> bool:
        """Take up the stored runtime schedule if it changed (or ``force``): True if the
        schedule dict changed. Raises ConsulLockError if Consul cannot be read."""
        if not self._started:
            self.config_names = frozenset(self.schedule) - set(self.applied)
            self.watch.start()
            self._started = True
        if not force and not self.watch.changed.is_set() and not self._stale:
            return False
        self.watch.changed.clear()
        was_paused = self.paused
        try:
            self.snapshot = self.store.snapshot(consistent=True)
        except ConsulLockError:
            self._stale = True  # not taken up: read again at the next tick (not woken at once)
            raise
        self._stale = False
        changed = self._apply(self.snapshot)
        if was_paused and not self.paused:
            log.info("runtime schedule: resumed; sending again")
        elif self.paused and not was_paused:
            log.warning("runtime schedule: paused (%s); sending nothing until resumed", self.snapshot.paused)
        return changed

    def _apply(self, snap: ScheduleSnapshot) -> bool:
        changed = False
        for name in self.config_names:
            override = snap.entries.get(name)
            disabled = override is not None and override.source == "config" and not override.enabled
            if disabled and name in self.schedule:
                self.parked[name] = self.schedule.pop(name)
                log.info("runtime schedule: config entry %s disabled", name)
                changed = True
            elif not disabled and name in self.parked:
                self.schedule[name] = self.parked.pop(name)
                log.info("runtime schedule: config entry %s enabled", name)
                changed = True
        wanted = {}
        for name, entry in snap.entries.items():
            if entry.source != "runtime":
                continue
            if name in self.config_names:
                if name not in self._shadowed:
                    log.warning("runtime schedule: entry %s is also in beat_schedule, which wins; ignoring the runtime one", name)
                    self._shadowed.add(name)
                continue
            if entry.enabled:
                wanted[name] = entry
        for name in set(self.applied) - set(wanted):
            self.schedule.pop(name, None)
            del self.applied[name]
            log.info("runtime schedule: entry %s removed or disabled", name)
            changed = True
        for name, entry in wanted.items():
            before = self.applied.get(name)
            if before is not None and before.index == entry.index:
                continue
            current = self.schedule.get(name)
            if before is not None and current is not None and before.timing == entry.timing:
                # Only args, kwargs or options changed: keep the entry's timing.
                current.args, current.kwargs, current.options = entry.args, entry.kwargs, entry.options
                log.info("runtime schedule: entry %s changed (args, kwargs or options; timing kept)", name)
            else:
                self.schedule[name] = self._new_entry(entry)
                log.info("runtime schedule: entry %s %s", name, "added" if before is None else "rescheduled")
            self.applied[name] = entry
            changed = True
        return changed

    def _new_entry(self, entry: EntryDefinition) -> Any:
        made = self._copy(entry)
        state = self.state_of(entry.name)
        if state is not None and state.get("definition") == self.definition_hash(made) and state.get("last_run_at"):
            made.last_run_at = datetime.fromisoformat(state["last_run_at"])
            made.total_run_count = int(state.get("total_run_count") or 0)
        elif isinstance(entry.schedule, once):
            made.last_run_at = NEVER
        return made

    def _copy(self, source: Any) -> Any:
        """A scheduler entry with the definition of ``source`` (an EntryDefinition or an entry)."""
        fields = ("name", "task", "schedule", "args", "kwargs", "options")
        return self.make_entry(**{f: getattr(source, f) for f in fields})

    # -- sending ------------------------------------------------------------------------------

    def refusal(self, entry: Any) -> str | None:
        """Why ``entry`` must not be sent now, by a consistent read made right before the send
        (so a disable, remove or pause whose write has returned is obeyed), or None."""
        snap = self.store.snapshot(consistent=True)
        if snap.index != (self.snapshot.index if self.snapshot else None):
            self.watch.changed.set()
        if getattr(entry, "consul_lock_tick", None) is not None:  # a run-now copy
            return "sending is paused" if snap.paused is not None else None
        return snap.refusal(entry.name, self.config_names)

    def run_requests(self) -> list[tuple[RunRequest, Any]]:
        """Pending run-now requests, each with the entry to send (a copy carrying its own
        tick id ``consul_lock_tick``); requests for entries that no longer exist are dropped."""
        out = []
        for request in self.snapshot.runs if self.snapshot else []:
            source = self.schedule.get(request.name) or self.parked.get(request.name)
            stored = self.snapshot.entries.get(request.name) if self.snapshot else None
            if source is None and stored is not None and stored.source == "runtime":
                source = self._new_entry(stored)
            if source is None:
                log.warning("runtime schedule: run-now of %s, which no longer exists; dropped", request.name)
                self.done(request, None)
                continue
            copy = self._copy(source)
            copy.consul_lock_tick = Tick.of(request.name, request.requested_at)
            out.append((request, copy))
        return out

    def done(self, request: RunRequest, fence: tuple[str, str] | None) -> None:
        """Delete a handled run-now request (fenced by the leader's session when ``fence`` =
        (lock key, session) is given)."""
        client = shared_client(self.store.settings)
        try:
            if fence is None:
                client.kv_delete(request.key, cas=request.index)
            else:
                delete = {"Verb": "delete-cas", "Key": request.key, "Index": request.index}
                client.kv_fenced(fence[0], fence[1], [delete], action="deleting a run-now request", resource=request.key)
        except ConsulLockError as exc:
            log.error("runtime schedule: could not delete the run-now request %s: %s", request.key, exc)
        if self.snapshot is not None:
            self.snapshot.runs.remove(request)

    def after_send(self, entry: Any) -> None:
        """A one-off entry that has run is disabled in the store (and leaves the schedule)."""
        if isinstance(entry.schedule, once) and entry.name in self.applied and getattr(entry, "consul_lock_tick", None) is None:
            try:
                self.store.disable(entry.name)
            except ConsulLockError as exc:  # its stored state (last run >= at) keeps it from running again
                log.error("runtime schedule: could not disable the one-off entry %s after its run: %s", entry.name, exc)
            self.schedule.pop(entry.name, None)
            self.applied.pop(entry.name, None)
            log.info("runtime schedule: one-off entry %s ran; disabled", entry.name)

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds`` (at most WAIT_MAX), or until the runtime schedule changes
        (True)."""
        return self.watch.changed.wait(min(seconds, WAIT_MAX))

    def stop(self) -> None:
        self.watch.stop()
