"""TLS: a real agent serving its API over HTTPS only, with certificates made by ``consul tls``.

The agent (module fixture) has its plain HTTP port off and ``verify_incoming_https = true``:
every request that works here went over TLS, verified the agent's certificate and presented
a client certificate. Locks are taken and released through it configured three ways (keyword
settings, Consul's own ``CONSUL_*`` variables, Celery settings in a real worker), and each
kind of misconfiguration gets an error that names the address and the setting to fix.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import time

import pytest
from celery import Celery

from celery_consul_lock import ConsulLock, ConsulLockError, ConsulSettings, ConsulUnavailable, InvalidSetting
from celery_consul_lock.consul import LOCK_FLAG

from .servers import ROOT, TLSConsulAgent, TLSFiles, make_tls_files, start_consul_tls, wait_consul_ready
from .test_gevent import run_green_child
from .workers import start_worker, worker_env

#: Every CONSUL_* variable the settings read; tests that set some clear all of them first.
CONSUL_ENV = (
    "CONSUL_HTTP_ADDR",
    "CONSUL_HTTP_TOKEN",
    "CONSUL_HTTP_SSL",
    "CONSUL_HTTP_SSL_VERIFY",
    "CONSUL_CACERT",
    "CONSUL_CLIENT_CERT",
    "CONSUL_CLIENT_KEY",
)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """The CA, the agent's certificate and a client certificate, from ``consul tls``."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A second, unrelated CA (and a client certificate it signed)."""
    return make_tls_files(tmp_path_factory.mktemp("tls-other"))


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, tls: TLSFiles):
    a = start_consul_tls(tmp_path_factory.mktemp("consul-tls"), tls, require_client_cert=True)
    try:
        wait_consul_ready(a)
        yield a
    finally:
        a.stop()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in CONSUL_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def tls_settings(files: TLSFiles, **changes: object) -> dict[str, object]:
    """Keyword settings for the agent's CA and a client certificate."""
    values: dict[str, object] = {
        "scheme": "https",
        "ca_file": str(files.ca),
        "client_cert": str(files.client_cert),
        "client_key": str(files.client_key),
        "lock_delay": 2,
    }
    values.update(changes)
    return values


def tls_env(agent: TLSConsulAgent, files: TLSFiles) -> dict[str, str]:
    return {
        "CONSUL_HTTP_ADDR": agent.url,
        "CONSUL_CACERT": str(files.ca),
        "CONSUL_CLIENT_CERT": str(files.client_cert),
        "CONSUL_CLIENT_KEY": str(files.client_key),
    }


def key_session(agent: TLSConsulAgent, key: str) -> str | None:
    """The session holding ``key``, as the agent says (read over HTTPS by the test itself)."""
    return agent.api(f"/v1/kv/{key}")[0].get("Session")


def assert_round_trip(agent: TLSConsulAgent, lock: ConsulLock, key: str) -> None:
    """Acquire, see the agent record the holder, see a second lock refused, release."""
    assert lock.settings.scheme == "https"
    assert lock.acquire(timeout=10)
    try:
        assert lock.held and lock.fencing_token
        assert key_session(agent, key)
        rival = ConsulLock(key, settings=lock.settings, private_session=True)
        assert not rival.acquire(blocking=False)
    finally:
        assert lock.release()
    assert key_session(agent, key) is None


def test_the_agent_serves_no_plain_http(agent: TLSConsulAgent):
    # The plain HTTP port given on the command line is switched off by `ports { http = -1 }`:
    # nothing in these tests can be reaching Consul without TLS.
    with pytest.raises(ConnectionRefusedError), socket.create_connection((agent.bind, agent.ports["http"]), 2):
        pass


def test_explicit_settings_take_and_release_a_lock_over_https(agent, tls, key, clean_env):
    settings = ConsulSettings(address=agent.address, **tls_settings(tls))
    assert_round_trip(agent, ConsulLock(key, settings=settings), key)
    # The same as keyword arguments of the lock.
    assert_round_trip(agent, ConsulLock(key, address=agent.address, **tls_settings(tls)), key)


@pytest.mark.parametrize("form", ["https-address", "consul-http-ssl"])
def test_consul_environment_variables_alone_configure_tls(agent, tls, key, clean_env, form):
    env = tls_env(agent, tls)
    if form == "consul-http-ssl":
        env["CONSUL_HTTP_ADDR"] = agent.address
        env["CONSUL_HTTP_SSL"] = "true"
    for name, value in env.items():
        clean_env.setenv(name, value)
    lock = ConsulLock(key, lock_delay=2)
    assert lock.settings.ca_file == str(tls.ca) and lock.settings.client_cert == str(tls.client_cert)
    assert_round_trip(agent, lock, key)


def test_verify_false_talks_to_the_agent_without_its_ca(agent, tls, key, clean_env):
    env = tls_env(agent, tls)
    del env["CONSUL_CACERT"]
    for name, value in env.items():
        clean_env.setenv(name, value)
    # Without the CA, the system's CAs do not know the agent's certificate...
    with pytest.raises(ConsulUnavailable, match="TLS verification of the agent's certificate failed"):
        ConsulLock(key, lock_delay=2).acquire(blocking=False)
    # ...and CONSUL_HTTP_SSL_VERIFY=false is what lets it through.
    clean_env.setenv("CONSUL_HTTP_SSL_VERIFY", "false")
    lock = ConsulLock(key, lock_delay=2)
    assert lock.settings.verify is False and lock.settings.ca_file is None
    assert_round_trip(agent, lock, key)


def test_celery_settings_configure_tls(agent, tls, clean_env):
    app = Celery("tls-settings", set_as_current=False)
    app.conf.update(
        consul_lock_address=agent.address,
        consul_lock_scheme="https",
        consul_lock_ca_file=str(tls.ca),
        consul_lock_client_cert=str(tls.client_cert),
        consul_lock_client_key=str(tls.client_key),
        consul_lock_lock_delay=2,
    )
    settings = ConsulSettings.from_celery(app.conf)
    assert (settings.base_url, settings.ca_file, settings.client_key) == (agent.url, str(tls.ca), str(tls.client_key))
    assert_round_trip(agent, ConsulLock("locks/tls-celery/.lock", settings=settings), "locks/tls-celery/.lock")


def test_a_real_worker_runs_a_locked_task_over_https_from_celery_settings(agent, tls, proj, r, redis_server, tmp_path):
    # The worker gets Consul's address and TLS files only as consul_lock_* Celery settings
    # (a config module), and no CONSUL_* variable.
    (tmp_path / "tlsconf.py").write_text(
        f"consul_lock_address = {agent.url!r}\n"
        f"consul_lock_ca_file = {str(tls.ca)!r}\n"
        f"consul_lock_client_cert = {str(tls.client_cert)!r}\n"
        f"consul_lock_client_key = {str(tls.client_key)!r}\n"
    )
    env = worker_env(redis_server.url, "")
    del env["CONSUL_HTTP_ADDR"]
    env.update(CELERY_CONFIG_MODULE="tlsconf", PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    worker = start_worker(proj.app, tmp_path, env, pool="solo", concurrency=1)
    try:
        assert proj.backup.delay(0.1).get(timeout=20) == "done"
    finally:
        worker.stop()
    runs = [json.loads(x) for x in r.lrange("runs", 0, -1)]
    assert [run["kind"] for run in runs] == ["start", "end"]
    assert isinstance(runs[0]["token"], int) and runs[0]["token"] > 0
    # The agent has the task's lock key, in the `consul lock` format, released.
    entry = agent.api("/v1/kv/locks/proj.backup/.lock")[0]
    assert entry["Flags"] == LOCK_FLAG and not entry.get("Session")
    assert "Traceback" not in worker.log_text()


def test_a_gevent_worker_keeps_and_watches_its_lock_over_https_from_its_real_threads(agent, tls, proj, r, redis_server, tmp_path):
    """``celery worker -P gevent`` over HTTPS: the session renewer and the watcher are real OS
    threads with real sockets (native.py), and gevent's patching of ``ssl`` must not keep
    them from speaking TLS. A body that blocks the whole process (no greenlet runs) for
    several fencing windows keeps its lock only if the renewer renews over TLS; a key
    deleted behind a body's back is seen as lost only if the watcher reads over TLS."""
    (tmp_path / "tlsconf.py").write_text(
        f"consul_lock_address = {agent.url!r}\n"
        f"consul_lock_ca_file = {str(tls.ca)!r}\n"
        f"consul_lock_client_cert = {str(tls.client_cert)!r}\n"
        f"consul_lock_client_key = {str(tls.client_key)!r}\n"
    )
    # TTL 10 s, lock-delay 2 s: renewals every 0.5 s, a renewer that cannot renew for 2 s
    # loses the lock at its fencing deadline.
    env = worker_env(redis_server.url, "", TEST_TTL="10", TEST_LOCK_DELAY="2")
    del env["CONSUL_HTTP_ADDR"]
    env.update(CELERY_CONFIG_MODULE="tlsconf", PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    worker = start_worker(proj.app, tmp_path, env, pool="gevent", concurrency=10)
    try:
        # 6 s blocked (three fencing windows, far past WATCH_DELAY): only the real threads run.
        assert proj.blocking.delay(6.0).get(timeout=60) == "finished"
        (end,) = [json.loads(x) for x in r.lrange("runs", 0, -1) if json.loads(x)["kind"] == "end"]
        assert end["held"] is True and end["lost"] is None, end
        assert " lost" not in worker.log_text(), worker.log_text()[-3000:]
        assert not agent.api("/v1/kv/locks/blocking/.lock")[0].get("Session")
        # The watcher follows a held lock over TLS: a key deleted behind the body's back is lost.
        result = proj.checked.delay(60.0)
        deadline = time.monotonic() + 30
        while not [x for x in r.lrange("runs", 0, -1) if json.loads(x).get("task") == "checked"]:
            worker.check_alive()
            assert time.monotonic() < deadline, "the checked run did not start"
            time.sleep(0.1)
        time.sleep(1.0)  # past WATCH_DELAY: the watcher follows the key now
        agent.api("/v1/kv/locks/proj.checked/.lock", "DELETE")
        with pytest.raises(Exception) as info:
            result.get(timeout=30)
        assert type(info.value).__name__ == "LockLost", info.value
        assert [json.loads(x)["kind"] for x in r.lrange("runs", 0, -1) if json.loads(x).get("task") == "checked"] == [
            "start",
            "lost",
        ]
    finally:
        worker.stop()
    log = worker.log_text()
    assert "lock locks/proj.checked/.lock lost" in log, log[-3000:]
    assert "TypeError" not in log and "Traceback" not in log.split("locks/proj.checked/.lock lost")[0], log[-3000:]


def test_the_real_threads_tls_under_gevent_verifies_fails_clearly_and_can_be_interrupted(agent, tls, other_ca, key):
    """The TLS that our real threads speak under gevent (an SSLObject over the real socket,
    see transport.py), from one of them in a patched child process: it reads through the
    verified agent, a wrong CA and a missing client certificate give the same messages as
    elsewhere, and interrupt() ends a blocking query at once."""
    good = tls_settings(tls)
    wrong_ca = tls_settings(tls, ca_file=str(other_ca.ca))
    no_cert = tls_settings(tls, client_cert=None, client_key=None)
    out = run_green_child(
        f"""
        from celery_consul_lock import ConsulSettings, ConsulUnavailable
        from celery_consul_lock.consul import ConsulClient
        from celery_consul_lock.transport import _TLSOverBIO

        out, blocked = {{}}, []

        def client(settings):
            return ConsulClient(ConsulSettings(address={agent.address!r}, **settings), native=True)

        def failure(settings):
            try:
                client(settings).kv_get({key!r})
            except ConsulUnavailable as exc:
                return str(exc)

        def real():
            try:
                c = client({good!r})
                index, entry = c.kv_get({key!r})
                out["read"] = [index > 0, entry is None, type(c._pool._all[0]._file.raw) is _TLSOverBIO]
                out["wrong_ca"] = failure({wrong_ca!r})
                out["no_cert"] = failure({no_cert!r})
                blocked.append(c)
                out["blocking"] = True
                started = time.monotonic()
                try:
                    c.kv_get({key!r}, index=index, wait=60)
                except ConsulUnavailable as exc:
                    out["interrupted"] = [str(exc), time.monotonic() - started]
            finally:
                out["done"] = True

        gevent.sleep(0)
        native.start_thread(real, (), "tls")
        until(lambda: "blocking" in out, 30)
        gevent.sleep(1.0)
        interrupted_at = time.monotonic()
        blocked[0].interrupt()
        until(lambda: "done" in out, 30)
        out["after_interrupt"] = time.monotonic() - interrupted_at
        print(json.dumps(out))
        """
    )
    assert out["read"] == [True, True, True], out
    assert agent.url in out["wrong_ca"] and "TLS verification of the agent's certificate failed" in out["wrong_ca"], out
    assert "consul_lock_ca_file / CONSUL_CACERT" in out["wrong_ca"], out
    assert agent.url in out["no_cert"] and "the agent requires a client certificate" in out["no_cert"], out
    message, _ = out["interrupted"]
    assert agent.url in message, out
    assert out["after_interrupt"] < 5, out
    print(f"interrupted after {out['after_interrupt']:.2f} s: {message}")


def test_a_wrong_ca_fails_with_a_message_naming_the_address_and_the_setting(agent, tls, other_ca, key, clean_env):
    lock = ConsulLock(key, address=agent.address, **tls_settings(tls, ca_file=str(other_ca.ca)))
    with pytest.raises(ConsulUnavailable) as info:
        lock.acquire(blocking=False)
    text = str(info.value)
    assert agent.url in text
    assert "TLS verification of the agent's certificate failed (unable to get local issuer certificate)" in text
    assert "consul_lock_ca_file / CONSUL_CACERT" in text
    # No ssl exception chained behind it, and it pickles (Celery stores it as a result).
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert str(pickle.loads(pickle.dumps(info.value))) == text


def test_a_blocking_acquire_does_not_wait_through_a_tls_failure(agent, tls, other_ca, key, clean_env):
    # The key is known to this process (a later acquire skips the first read); a TLS error
    # is a configuration problem, so it is raised at once, not retried until the timeout.
    with ConsulLock(key, address=agent.address, **tls_settings(tls)):
        pass
    lock = ConsulLock(key, address=agent.address, **tls_settings(tls, ca_file=str(other_ca.ca)))
    started = time.monotonic()
    with pytest.raises(ConsulUnavailable) as info:
        lock.acquire(timeout=30)
    assert time.monotonic() - started < 10, "a TLS failure must not be retried until the timeout"
    assert not info.value.transient and "Check that the agent runs there" not in str(info.value)


def test_a_wrong_ca_in_a_script_prints_the_message_not_an_ssl_traceback(agent, tls, other_ca):
    # What a user sees running the first example of docs/lock.md with CONSUL_CACERT pointing at
    # the wrong CA: one ConsulUnavailable with the message, no ssl internals.
    env = {k: v for k, v in os.environ.items() if k not in CONSUL_ENV}
    env.update(tls_env(agent, tls), CONSUL_CACERT=str(other_ca.ca), PYTHONPATH=str(ROOT))
    script = "from celery_consul_lock import ConsulLock\nwith ConsulLock('locks/backup/.lock'):\n    print('ran')\n"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "ran" not in out.stdout
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"celery_consul_lock.errors.ConsulUnavailable: Consul agent at {agent.url} ")
    assert "TLS verification of the agent's certificate failed" in last and "CONSUL_CACERT" in last
    for noise in ("SSLCertVerificationError", "ssl.py", "During handling of the above exception", "direct cause"):
        assert noise not in out.stderr


def test_without_a_client_certificate_the_error_names_the_settings_to_set(agent, tls, key, clean_env):
    lock = ConsulLock(key, address=agent.address, scheme="https", ca_file=str(tls.ca), lock_delay=2)
    with pytest.raises(ConsulUnavailable) as info:
        lock.acquire(blocking=False)
    text = str(info.value)
    assert agent.url in text and "the agent requires a client certificate" in text
    assert "consul_lock_client_cert and consul_lock_client_key / CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY" in text


def test_a_client_certificate_from_another_ca_is_reported_as_refused(agent, tls, other_ca, key, clean_env):
    settings = tls_settings(tls, client_cert=str(other_ca.client_cert), client_key=str(other_ca.client_key))
    with pytest.raises(ConsulUnavailable) as info:
        ConsulLock(key, address=agent.address, **settings).acquire(blocking=False)
    text = str(info.value)
    assert agent.url in text and f"the agent refused the client certificate {str(other_ca.client_cert)!r}" in text


def test_plain_http_to_the_https_port_says_so(agent, key, clean_env):
    with pytest.raises(ConsulLockError, match="Client sent an HTTP request to an HTTPS server") as info:
        ConsulLock(key, address=agent.address, lock_delay=2).acquire(blocking=False)
    assert f"http://{agent.address}" in str(info.value)


@pytest.mark.parametrize(
    ("given", "env", "message"),
    [
        ({"ca_file": "/no/such/ca.pem"}, {}, "ca_file='/no/such/ca.pem' is invalid: no such file"),
        ({}, {"CONSUL_CACERT": "/no/such/ca.pem"}, "CONSUL_CACERT='/no/such/ca.pem' is invalid: no such file"),
        ({}, {"CONSUL_CLIENT_KEY": "/no/such/key.pem"}, "CONSUL_CLIENT_KEY='/no/such/key.pem' is invalid: no such file"),
    ],
)
def test_a_tls_file_that_does_not_exist_is_refused_at_start_up(given, env, message):
    with pytest.raises(InvalidSetting) as info:
        ConsulSettings.resolve({"scheme": "https", **given}, env=env)
    assert str(info.value) == message


def test_a_missing_ca_file_in_celery_settings_is_refused_naming_the_celery_setting(clean_env):
    app = Celery("tls-bad", set_as_current=False)
    app.conf.consul_lock_ca_file = "/no/such/ca.pem"
    with pytest.raises(InvalidSetting) as info:
        ConsulSettings.from_celery(app.conf)
    assert str(info.value) == "consul_lock_ca_file='/no/such/ca.pem' is invalid: no such file"


def test_a_swapped_certificate_and_key_are_refused_at_start_up(tls, clean_env):
    with pytest.raises(InvalidSetting) as info:
        ConsulSettings.resolve({}, env={"CONSUL_CLIENT_CERT": str(tls.client_key), "CONSUL_CLIENT_KEY": str(tls.client_cert)})
    assert str(info.value) == (
        f"CONSUL_CLIENT_CERT={str(tls.client_key)!r} is invalid: not a PEM certificate (no '-----BEGIN ...CERTIFICATE-----' line)"
    )


def test_a_key_that_is_not_the_certificates_is_refused_at_first_connection(agent, tls, key, clean_env):
    # Both files are PEM, so only loading them together can tell: at the first connection,
    # still as InvalidSetting rather than an ssl traceback.
    lock = ConsulLock(key, address=agent.address, **tls_settings(tls, client_key=str(tls.server_key)))
    with pytest.raises(InvalidSetting) as info:
        lock.acquire(blocking=False)
    assert str(info.value).startswith(f"client_key={str(tls.server_key)!r} is invalid: cannot be loaded with client_cert=")
    assert "KEY_VALUES_MISMATCH" in str(info.value)
