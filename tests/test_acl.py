"""ACL: a real agent with ``default_policy = "deny"``, bootstrapped here.

The documented policy (docs/acl-tls.md, "Consul ACL policy") works end to end; a token without
``session:write`` or without ``key:write`` on the prefix gets an error naming that
permission; the token never shows in a log line, a repr or an error.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from celery_consul_lock import ACLDenied, ConsulLock, ConsulSettings

from .servers import start_consul, wait_for
from .test_command import consul_lock_cmd
from .workers import worker_env

#: The minimal policy for workers and beats, as docs/acl-tls.md documents it.
POLICY = """
key_prefix "locks/" { policy = "write" }
key_prefix "celery-consul-lock/" { policy = "write" }
session_prefix "" { policy = "write" }
node_prefix "" { policy = "read" }
service_prefix "celery-beat-" { policy = "write" }
service_prefix "celery-consul-lock-run" { policy = "write" }
"""


def _without(policy: str, rule: str) -> str:
    return "\n".join(line for line in policy.splitlines() if not line.startswith(rule))


@pytest.fixture(scope="module")
def acl_agent(tmp_path_factory):
    hcl = 'acl { enabled = true, default_policy = "deny", enable_token_persistence = true }'
    agent = start_consul(tmp_path_factory.mktemp("consul-acl"), node="aclnode", hcl=[hcl])
    try:
        wait_for(lambda: agent.leader(), 30, "a leader")
        management = wait_for(lambda: agent.api("/v1/acl/bootstrap", "PUT")["SecretID"], 30, "ACL bootstrap")
        # Let the agent itself register and check its node under default deny.
        agent_policy = agent.api(
            "/v1/acl/policy", "PUT", {"Name": "agent", "Rules": 'node_prefix "" { policy = "write" }'}, token=management
        )
        agent_token = agent.api("/v1/acl/token", "PUT", {"Policies": [{"ID": agent_policy["ID"]}]}, token=management)["SecretID"]
        agent.api("/v1/agent/token/agent", "PUT", {"Token": agent_token}, token=management)

        def token(rules: str, name: str) -> str:
            policy = agent.api("/v1/acl/policy", "PUT", {"Name": name, "Rules": rules}, token=management)
            return agent.api("/v1/acl/token", "PUT", {"Policies": [{"ID": policy["ID"]}]}, token=management)["SecretID"]

        tokens = {
            "full": token(POLICY, "celery-consul-lock"),
            "no-session": token('key_prefix "locks/" { policy = "write" }', "no-session"),
            "no-key": token('session_prefix "" { policy = "write" }\nkey_prefix "locks/" { policy = "read" }', "no-key"),
            "no-state": token(_without(POLICY, 'key_prefix "celery-consul-lock/"'), "no-state"),
            "no-service": token(_without(POLICY, "service_prefix"), "no-service"),
        }
        # serfHealth of the node must pass before sessions can be created.
        wait_for(lambda: agent.api("/v1/session/create", "PUT", {"TTL": "10s"}, token=tokens["full"]), 30, "a session")
        yield agent, tokens
    finally:
        agent.stop()


def test_documented_policy_works_end_to_end_and_the_token_stays_secret(acl_agent, caplog):
    agent, tokens = acl_agent
    caplog.set_level(logging.DEBUG, logger="celery_consul_lock")
    settings = ConsulSettings(address=agent.address, token=tokens["full"], lock_delay=2)
    lock = ConsulLock("locks/acl/.lock", settings=settings)
    with lock:
        assert lock.held and lock.fencing_token
    assert tokens["full"] not in repr(lock) + repr(settings) + caplog.text


def test_a_token_without_session_write_gets_an_error_naming_it(acl_agent):
    agent, tokens = acl_agent
    lock = ConsulLock("locks/acl/.lock", address=agent.address, token=tokens["no-session"], lock_delay=2)
    with pytest.raises(ACLDenied) as info:
        lock.acquire(blocking=False)
    assert "session:write" in str(info.value) and tokens["no-session"] not in str(info.value)


def test_a_token_without_key_write_gets_an_error_naming_the_key(acl_agent):
    agent, tokens = acl_agent
    lock = ConsulLock("locks/acl-ro/.lock", address=agent.address, token=tokens["no-key"], lock_delay=2)
    with pytest.raises(ACLDenied) as info:
        lock.acquire(blocking=False)
    text = str(info.value)
    assert "key:write" in text and "locks/acl-ro/.lock" in text and tokens["no-key"] not in text


def test_a_token_consul_does_not_know_is_named_as_unknown_not_as_a_missing_permission(acl_agent):
    agent, _ = acl_agent
    unknown = "00000000-dead-beef-0000-000000000000"
    lock = ConsulLock("locks/acl-unknown/.lock", address=agent.address, token=unknown, lock_delay=2)
    with pytest.raises(ACLDenied) as info:
        lock.acquire(blocking=False)
    text = str(info.value)
    assert info.value.token_unknown and "does not know the ACL token" in text, text
    assert "session:write" not in text and unknown not in text, text
    done = consul_lock_cmd(_env(agent, unknown), "check")
    assert done.returncode == 1 and "does not know the ACL token" in done.stderr and unknown not in done.stderr, done


# -- the consul-lock command under ACLs ---------------------------------------------------------


def _env(agent, token: str) -> dict[str, str]:
    return worker_env("redis://127.0.0.1:1/0", agent.address, CONSUL_HTTP_TOKEN=token)


def test_check_passes_with_the_documented_policy_and_status_never_prints_the_token(acl_agent):
    agent, tokens = acl_agent
    env = _env(agent, tokens["full"])
    done = consul_lock_cmd(env, "check", "-v")
    assert done.returncode == 0 and "check OK" in done.stdout, done
    lock = ConsulLock("locks/acl-status/.lock", address=agent.address, token=tokens["full"], lock_delay=2)
    with lock:
        shown = [consul_lock_cmd(env, "status"), consul_lock_cmd(env, "status", "--json")]
    for out in shown:
        assert out.returncode == 0 and "locks/acl-status/.lock" in out.stdout, out
    everything = done.stdout + done.stderr + "".join(out.stdout + out.stderr for out in shown)
    assert tokens["full"] not in everything


@pytest.mark.parametrize(
    ("token", "named"),
    [
        ("no-session", ["session:write"]),
        ("no-key", ["key:write", "'locks/celery-consul-lock-check-"]),
        ("no-state", ["key:write", "'celery-consul-lock/celery-consul-lock-check-"]),
        ("no-service", ["service:write", "celery-beat-proj"]),
    ],
)
def test_check_fails_naming_the_permission_the_token_lacks(acl_agent, token, named):
    agent, tokens = acl_agent
    done = consul_lock_cmd(_env(agent, tokens[token]), "check")
    assert done.returncode == 1 and done.stdout == "", done
    assert "check FAILED" in done.stderr and "Traceback" not in done.stderr, done.stderr
    for text in named:
        assert text in done.stderr, done.stderr
    assert tokens[token] not in done.stderr


def test_check_no_beat_does_not_need_service_write(acl_agent):
    agent, tokens = acl_agent
    done = consul_lock_cmd(_env(agent, tokens["no-service"]), "check", "--no-beat")
    assert done.returncode == 0 and "service:write" not in done.stdout, done


def test_celery_consul_lock_run_works_with_the_documented_policy_and_names_a_missing_service_rule(acl_agent, tmp_path):
    agent, tokens = acl_agent
    wrapper = str(Path(sys.executable).parent / "celery-consul-lock")

    def run(token: str, marker: Path) -> subprocess.Popen:
        env = {**os.environ, "CONSUL_HTTP_ADDR": agent.address, "CONSUL_HTTP_TOKEN": token}
        args = ["run", "--key", "locks/acl-run", "--every", "3600", "--lock-delay", "2", "--", "touch", str(marker)]
        return subprocess.Popen([wrapper, *args], env=env, stderr=subprocess.PIPE, text=True)

    full, no_service = run(tokens["full"], tmp_path / "ran"), run(tokens["no-service"], tmp_path / "not-ran")
    full_err, no_service_err = full.communicate(timeout=60)[1], no_service.communicate(timeout=60)[1]
    assert full.returncode == 0 and (tmp_path / "ran").exists(), full_err
    # Its session is tied to a health check of its own: registering it needs service:write.
    assert no_service.returncode == 69 and not (tmp_path / "not-ran").exists(), no_service_err
    assert "service:write" in no_service_err and "celery-consul-lock-run" in no_service_err, no_service_err
    assert tokens["full"] not in full_err and tokens["no-service"] not in no_service_err


def test_the_documented_policy_lets_a_sweep_remove_free_lock_keys(acl_agent):
    # The sweep lists the whole (empty) prefix: Consul leaves out what the token cannot read,
    # and the keys under locks/ and the index clock under celery-consul-lock/ are writable.
    from celery_consul_lock.consul import LOCK_FLAG, ConsulClient
    from celery_consul_lock.reap import CLOCK_KEY, sweep

    agent, tokens = acl_agent
    settings = ConsulSettings(address=agent.address, token=tokens["full"], lock_delay=2)
    client = ConsulClient(settings)
    try:
        assert client.kv_put("locks/acl-swept/.lock", b'{"keep_until": 1}', flags=LOCK_FLAG)  # released long ago
        assert "locks/acl-swept/.lock" in sweep(client, settings).removed
        assert client.kv_get(CLOCK_KEY)[1] is not None
    finally:
        client.close()
