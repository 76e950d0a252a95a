"""lock_at="both": send-time dedupe with real senders, a real broker and a real worker."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from .servers import ROOT, wait_for
from .test_interop import _kv

KEY = "locks/proj.sent_once/.lock"


def value_of(kv: dict) -> dict:
    return json.loads(base64.b64decode(kv["Value"]))


def sender(redis_url: str, consul_address: str, go: str, threads: int) -> subprocess.Popen:
    """A process that sends ``threads`` calls of proj.sent_once at once (when ``go`` exists)
    and prints the task ids it got back."""
    script = textwrap.dedent(
        f"""
        import json, os, threading, time
        os.environ["CONSUL_HTTP_ADDR"] = {consul_address!r}
        from tests.proj import app as proj
        proj.app.conf.broker_url = proj.app.conf.result_backend = {redis_url!r}
        ids = []
        def send():
            ids.append(proj.sent_once.delay(2.0).id)
        workers = [threading.Thread(target=send) for _ in range({threads})]
        while not os.path.exists({go!r}):
            time.sleep(0.01)
        for t in workers: t.start()
        for t in workers: t.join()
        print(json.dumps(ids))
        """
    )
    return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(autouse=True)
def _free_key(consul, proj, monkeypatch):
    """The key starts free; this process sends through the test's agent."""
    monkeypatch.setitem(proj.app.conf, "consul_lock_address", consul.address)
    monkeypatch.setattr(proj.sent_once, "_consul_settings", None)
    consul.api(f"/v1/kv/{KEY}", "DELETE")
    yield
    consul.api(f"/v1/kv/{KEY}", "DELETE")


def test_twenty_concurrent_sends_publish_one_message_which_the_run_takes_over_without_a_gap(
    proj, workers, r, consul, redis_server, tmp_path
):
    go = tmp_path / "go"
    senders = [sender(redis_server.url, consul.address, str(go), 5) for _ in range(4)]
    time.sleep(1.5)  # not an assertion: let the senders import and wait at the barrier
    go.touch()
    answers = [p.communicate(timeout=60) for p in senders]
    ids = [i for out, _ in answers for i in json.loads(out)]
    assert len(ids) == 20 and len(set(ids)) == 1, (ids, [err[-3000:] for _, err in answers])
    (task_id,) = set(ids)
    assert r.llen("celery") == 1, "more than one message reached the broker"
    reserved = _kv(consul, KEY)
    assert reserved["Session"] and value_of(reserved)["task_id"] == task_id and value_of(reserved)["reserved"]

    # From here to the end of the run, someone holds the key at every read.
    seen: list[str | None] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            kv = _kv(consul, KEY)
            seen.append(kv.get("Session") if kv else None)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        workers(1, concurrency=2)
        wait_for(lambda: r.llen("runs") >= 1, 30, "the run to start")
        running = _kv(consul, KEY)
        assert running["Session"] != reserved["Session"] and value_of(running)["task_id"] == task_id
        assert reserved["Session"] not in {s["ID"] for s in consul.api("/v1/session/list")}, "the reservation was not ended"
        # A send while it runs publishes nothing and returns the running copy's id.
        assert proj.sent_once.delay(2.0).id == task_id
        wait_for(lambda: r.llen("runs") >= 2, 30, "the run to end")
    finally:
        stop.set()
        watcher.join()
    # (The run releases the key as it ends: reads after the last held one are after the end.)
    held_until = max(i for i, sid in enumerate(seen) if sid)
    gaps = [i for i, sid in enumerate(seen[:held_until]) if not sid]
    assert not gaps, f"the key was free at reads {gaps} of {len(seen)} between the send and the end of the run"
    assert len(set(seen[: held_until + 1])) == 2, "expected two holders: the reservation, then the run"
    assert proj.app.AsyncResult(task_id).get(timeout=30) == "done"

    # Once the run has ended, the next send is a new message.
    again = proj.sent_once.delay(0.1)
    assert again.id != task_id and again.get(timeout=30) == "done"
    assert [json.loads(x)["id"] for x in r.lrange("runs", 0, -1) if json.loads(x)["kind"] == "start"] == [task_id, again.id]


def test_a_reservation_whose_message_never_runs_frees_itself_within_twice_its_ttl(proj, r, consul):
    first = proj.sent_once.delay(0.1)
    assert _kv(consul, KEY)["Session"]
    assert proj.sent_once.delay(0.1).id == first.id
    r.delete("celery")  # the message is lost (no worker ever runs it)
    sent = time.monotonic()
    wait_for(lambda: not (_kv(consul, KEY) or {}).get("Session"), 2 * 10 + 10, "the reservation to expire")
    assert time.monotonic() - sent >= 9, "the reservation ended before its TTL"
    second = proj.sent_once.delay(0.1)
    assert second.id != first.id and r.llen("celery") == 1


def test_lock_at_send_runs_a_copy_that_was_not_deduplicated_even_while_the_key_is_held(proj, workers, r, consul, settings):
    from celery_consul_lock import ConsulLock

    workers(1, concurrency=1)
    with ConsulLock("locks/proj.sent_only/.lock", settings=settings, name="a cron script"):
        # Held by something that is not a task message: nothing to return, so it is sent.
        first = proj.sent_only.delay()
        # send_task by name makes no reservation at all.
        second = proj.app.send_task("proj.sent_only")
        assert first.get(timeout=30) == "done" and second.get(timeout=30) == "done"
    starts = [json.loads(x)["id"] for x in r.lrange("runs", 0, -1)]
    assert sorted(starts) == sorted([first.id, second.id])
