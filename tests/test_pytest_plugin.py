"""The package's pytest plugin, as a user's test suite meets it: a pytest run in a fresh
directory (pytester, in a subprocess) that knows nothing of this repository's conftest, where
the plugin is loaded only through its ``pytest11`` entry point."""

from __future__ import annotations

import re
import textwrap

import pytest

from celery_consul_lock.testing import BinaryNotFound, consul_binary

from .servers import ROOT, binaries

#: The user's tests: a ConsulLock on the fixture's agent, and a locked task run eagerly by
#: Celery's own pytest fixtures (celery.contrib.pytest), once through ``celery_config`` and
#: once through the plugin's ``consul_lock_app``. Each checks, in Consul itself, that the
#: lock was really taken on that agent.
USER_TESTS = '''
import pytest

from celery_consul_lock import ConsulLock, ConsulLockedTask

pytest_plugins = ("celery.contrib.pytest",)


@pytest.fixture(scope="session")
def celery_config(consul_lock_celery_config):
    return {"task_always_eager": True, **consul_lock_celery_config}


def holder_session(consul_agent, key):
    entries = consul_agent.api(f"/v1/kv/{key}")
    return entries[0].get("Session") if entries else None


def test_a_lock_on_the_throwaway_agent(consul_agent):
    assert consul_agent.address.startswith("127.0.0.1:")
    with ConsulLock("locks/user-job/.lock", address=consul_agent.address) as lock:
        assert holder_session(consul_agent, "locks/user-job/.lock") == lock.session_id
        assert not ConsulLock("locks/user-job/.lock", address=consul_agent.address).acquire(blocking=False)
    assert holder_session(consul_agent, "locks/user-job/.lock") is None


def test_an_eager_locked_task_through_celery_config(celery_app, consul_agent):
    @celery_app.task(bind=True, base=ConsulLockedTask, lock_key="locks/eager-{n}/.lock")
    def report(self, n):
        return holder_session(consul_agent, f"locks/eager-{n}/.lock") == self.lock.session_id

    assert celery_app.conf.consul_lock_address == consul_agent.address
    assert report.delay(7).get(timeout=30) is True
    assert holder_session(consul_agent, "locks/eager-7/.lock") is None


def test_an_eager_locked_task_through_consul_lock_app(consul_lock_app, consul_agent):
    @consul_lock_app.task(bind=True, base=ConsulLockedTask, lock_key="locks/nightly/.lock")
    def nightly(self):
        return holder_session(consul_agent, "locks/nightly/.lock") == self.lock.session_id

    assert nightly.delay().get(timeout=30) is True
'''


def _run(pytester: pytest.Pytester, source: str) -> pytest.RunResult:
    pytester.makepyfile(test_user=source)
    # -p no:celery: pytest-celery (installed here, with its Docker fixtures) is off, as in our
    # own runs; Celery's classic fixtures come from celery.contrib.pytest, as a user loads them.
    return pytester.runpytest_subprocess("-p", "no:celery", "-p", "no:cacheprovider", "-q", timeout=180)


def test_a_users_tests_take_the_agent_from_the_plugin_beside_celerys_fixtures(pytester: pytest.Pytester) -> None:
    binaries()  # the consul binary provisioned for this suite, as CONSUL_BIN
    result = _run(pytester, USER_TESTS)
    result.assert_outcomes(passed=3)
    # The sessions the tests' locks used end before the agent does, not at exit against it.
    for lines in (result.outlines, result.errlines):
        assert not [line for line in lines if "could not destroy session" in line], lines


def documented_files() -> dict[str, str]:
    """The code blocks of docs/testing.md ("Testing your tasks"), by the file their first line
    names (``# conftest.py``)."""
    page = (ROOT / "docs" / "testing.md").read_text()
    return {m[1]: m[2] for m in re.finditer(r"```python\n# (\S+\.py)\n(.*?)```", page, re.S)}


def test_the_documented_user_test_passes_as_written(pytester: pytest.Pytester) -> None:
    files = documented_files()
    assert sorted(files) == ["conftest.py", "test_backup.py"], sorted(files)
    binaries()
    pytester.makeconftest(files["conftest.py"])
    result = _run(pytester, files["test_backup.py"])
    result.assert_outcomes(passed=1)


def test_no_consul_binary_is_an_error_naming_consul_bin_and_path(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.delenv("CONSUL_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(BinaryNotFound, match=r"CONSUL_BIN is not set and `consul` is not on PATH"):
        consul_binary()
    result = _run(
        pytester,
        textwrap.dedent(
            """
            def test_wants_a_lock(consul_agent):
                raise AssertionError("ran without an agent")
            """
        ),
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*BinaryNotFound: no `consul` binary found: CONSUL_BIN is not set*not on PATH*"])
    result.stdout.no_fnmatch_line("*ran without an agent*")
    result.stdout.no_fnmatch_line("*skipped*")
