"""The Consul adapter against a real agent: sessions, KV, blocking queries, txn, errors."""

from __future__ import annotations

import base64
import json
import re
import threading
import time

import pytest

from celery_consul_lock import ConsulLockError, ConsulSettings, ConsulUnavailable, SessionGone
from celery_consul_lock.consul import LOCK_FLAG, ConsulClient, kv_set

from .servers import free_port


@pytest.fixture
def client(settings: ConsulSettings):
    c = ConsulClient(settings)
    yield c
    c.close()


def test_session_create_renew_info_destroy(client, consul):
    sid = client.session_create("t", ttl=10, lock_delay=2, checks=["serfHealth"])
    info = client.session_info(sid)
    assert info["Name"] == "t" and info["LockDelay"] == 2_000_000_000 and info["TTL"] == "10s"
    assert client.session_renew(sid) == 10.0
    assert client.session_destroy(sid)
    assert client.session_info(sid) is None
    with pytest.raises(SessionGone) as info_exc:
        client.session_renew(sid)
    assert sid in str(info_exc.value) and consul.address in str(info_exc.value)


def test_lock_via_txn_returns_the_modify_index_and_why_it_failed(client, key):
    a = client.session_create("a", ttl=10, lock_delay=1, checks=["serfHealth"])
    b = client.session_create("b", ttl=10, lock_delay=1, checks=["serfHealth"])
    try:
        got = client.kv_lock(key, a, b"v", exists=False)
        _, entry = client.kv_get(key, consistent=True)
        assert got.acquired and got.modify_index == entry.modify_index and entry.flags == LOCK_FLAG and entry.session == a
        assert client.kv_lock(key, b, b"v").reason == "held"
        client.session_destroy(a)  # an invalidation: lock-delay follows
        assert client.kv_lock(key, b, b"v").reason == "lock-delay"
        assert client.kv_lock(key, "00000000-0000-0000-0000-000000000000", b"v").reason in ("session", "lock-delay")
    finally:
        client.session_destroy(b)


def test_release_only_frees_for_the_holding_session(client, key):
    a = client.session_create("a", ttl=10, lock_delay=0, checks=[])
    b = client.session_create("b", ttl=10, lock_delay=0, checks=[])
    try:
        assert client.kv_lock(key, a, b"v", exists=False).acquired
        assert client.kv_release(key, b, b"v") is False
        assert client.kv_get(key)[1].session == a
        assert client.kv_release(key, a, b"v") is True
        assert client.kv_get(key)[1].session is None
    finally:
        client.session_destroy(a)
        client.session_destroy(b)


def test_blocking_read_returns_when_the_key_changes(client, settings, key):
    client.kv_put(key, b"1")
    index, _ = client.kv_get(key)
    writer = ConsulClient(settings)
    timer = threading.Timer(0.3, writer.kv_put, (key, b"2"))
    timer.start()
    t0 = time.monotonic()
    new_index, entry = client.kv_get(key, index=index, wait=20, consistent=True)
    assert entry.value == b"2" and new_index > index and time.monotonic() - t0 < 10
    timer.join()
    writer.close()


def test_blocking_read_ends_at_its_wait(client, key):
    client.kv_put(key, b"1")
    index, _ = client.kv_get(key)
    t0 = time.monotonic()
    same, entry = client.kv_get(key, index=index, wait=1)
    assert same == index and entry.value == b"1" and 0.9 < time.monotonic() - t0 < 5


def test_fenced_write_with_check_session(client, key):
    sid = client.session_create("f", ttl=10, lock_delay=0, checks=[])
    other = client.session_create("o", ttl=10, lock_delay=0, checks=[])
    mark = key.replace(".lock", "mark")
    try:
        assert client.kv_lock(key, sid, b"", exists=False).acquired
        # The holder's write: applied, with the key's new index to check-and-set on next.
        done = client.kv_fenced(key, sid, [kv_set(mark, b"1", index=0)], action="test")
        _, entry = client.kv_get(mark)
        assert done.ok and not done.lost and entry.value == b"1" and done.results[0]["ModifyIndex"] == entry.modify_index
        # Another session's write: refused by the session check, nothing written.
        done = client.kv_fenced(key, other, [kv_set(mark, b"2")], action="test")
        assert not done.ok and done.lost and "failed session check" in done.errors[0]["What"]
        assert client.kv_get(mark)[1].value == b"1"
        # The holder's stale check-and-set: refused, but not for a lost lock.
        done = client.kv_fenced(key, sid, [kv_set(mark, b"3", index=entry.modify_index - 1)], action="test")
        assert not done.ok and not done.lost and client.kv_get(mark)[1].value == b"1"
    finally:
        client.session_destroy(sid)
        client.session_destroy(other)


def test_a_fenced_write_of_more_keys_than_one_transaction_takes_goes_in_several(client, key):
    """Consul takes 64 operations per transaction: 150 writes go in three, each fenced."""
    sid = client.session_create("f", ttl=10, lock_delay=0, checks=[])
    prefix = key.replace(".lock", "many/")
    try:
        assert client.kv_lock(key, sid, b"", exists=False).acquired
        writes = [kv_set(f"{prefix}{i:03d}", str(i).encode()) for i in range(150)]
        done = client.kv_fenced(key, sid, writes, action="test")
        assert done.ok and [r["Key"] for r in done.results] == [f"{prefix}{i:03d}" for i in range(150)]
        assert [e.value for e in client.kv_keys(prefix)] == [str(i).encode() for i in range(150)]
        client.kv_release(key, sid, b"")
        assert client.kv_fenced(key, sid, writes, action="test").lost
    finally:
        client.session_destroy(sid)


def test_unreachable_agent_error_names_the_address():
    port = free_port()
    c = ConsulClient(ConsulSettings(address=f"127.0.0.1:{port}", timeout=2))
    with pytest.raises(ConsulUnavailable) as info:
        c.session_create("x", ttl=10, lock_delay=1, checks=[])
    text = str(info.value)
    assert f"http://127.0.0.1:{port}" in text and "connection refused" in text and "CONSUL_HTTP_ADDR" in text


def test_a_request_consul_refuses_is_an_error_quoting_its_answer(client, consul):
    """A status no call expects (here Consul's 500 for a session behaviour it does not
    know) becomes one ConsulLockError naming the agent, the call and Consul's reason."""
    with pytest.raises(ConsulLockError) as info:
        client.session_create("x", ttl=10, lock_delay=1, checks=[], behavior="bogus")
    text = str(info.value)
    assert type(info.value) is ConsulLockError and f"Consul at http://{consul.address} answered " in text, text
    assert "while creating a session" in text and "bogus" in text.lower(), text


def test_token_goes_in_a_header_not_the_url(settings, monkeypatch):
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "env-token-must-not-win")
    c = ConsulClient(settings.replace(token="tok-123"))
    assert c._headers == {"X-Consul-Token": "tok-123"}
    assert "tok-123" not in repr(c)


def test_lock_txn_reports_a_wrong_guess_of_existence_and_writes_nothing(client, key):
    sid = client.session_create("g", ttl=10, lock_delay=0, checks=[])
    try:
        assert client.kv_lock(key, sid, b"v", exists=True).reason == "missing"
        assert client.kv_get(key)[1] is None
        client.kv_put(key, b"x")
        assert client.kv_lock(key, sid, b"v", exists=False).reason == "exists"
        got = client.kv_lock(key, sid, b"v", exists=True)
        assert got.acquired and got.conflict is None  # flags 0: a lock, as curl scripts make them
        client.kv_release(key, sid, b"v")
        client.kv_put(key, b"semaphore", flags=0xE0F69A2BAA414DE0)
        got = client.kv_lock(key, sid, b"v", exists=True)
        assert got.acquired and got.conflict.value == b"semaphore" and got.conflict.flags == 0xE0F69A2BAA414DE0
    finally:
        client.session_destroy(sid)


def test_the_quick_reading_of_a_lock_answer_agrees_with_decoding_it(client, key):
    """kv_lock reads the usual answer with a few byte patterns instead of decoding the JSON;
    on the real answers of both forms (create, then re-take), it must find what decoding
    finds, also for a key whose name holds the very field names it looks for."""
    from celery_consul_lock.consul import _LOCK_TXN, _quick_lock_answer

    sid = client.session_create("q", ttl=10, lock_delay=0, checks=[])
    odd = f'{key}"x "Flags": 7, "ModifyIndex": 9, "Value": "QQ=="'  # quotes in it, escaped in the answer
    quoted = json.dumps(odd)
    value = base64.b64encode(b"previous").decode()
    try:
        for exists in (False, True):
            body = _LOCK_TXN % ("get" if exists else "check-not-exists", quoted, quoted, value, LOCK_FLAG, json.dumps(sid))
            code, answer = client._request(
                "PUT", client._txn_target, body.encode(), "test", "key:write", key, read=lambda s, h, c: (s, c)
            )
            assert code == 200, answer
            results = json.loads(answer)["Results"]
            quick = _quick_lock_answer(answer, exists)
            assert quick is not None and quick.acquired and quick.conflict is None
            assert quick.modify_index == results[-1]["KV"]["ModifyIndex"] > 0
            assert quick.previous == (results[0]["KV"]["Value"] if exists else None)
            assert client.kv_release(odd, sid, b"previous")
        assert quick.previous == value
        # Another kind of key (a semaphore's flags): not read quickly, decoded instead.
        other = re.sub(rb'"Flags":(\s*)%d' % LOCK_FLAG, rb'"Flags":\g<1>7', answer, count=1)
        assert _quick_lock_answer(other, True) is None
        assert _quick_lock_answer(b'{"Results":[],"Errors":null}', True) is None
    finally:
        client.session_destroy(sid)
