"""ansible-runner for real, on tiny local playbooks (a few seconds, no services)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cvmfs_publisher_consumer.config import load
from cvmfs_publisher_consumer.redact import secret_values
from cvmfs_publisher_consumer.runner import PlaybookRunner, module_death, outcome_of

PLAYBOOK_OK = """
- hosts: localhost
  gather_facts: false
  tasks:
    - ansible.builtin.copy:
        dest: "{{ out }}"
        content: "{{ {'repo': cvmfs_repository, 'keys': cvmfs_sync_keys | default([]),
                      'endpoint': cvmfs_publisher_rgw_endpoint} | to_json }}"
"""
PLAYBOOK_FAIL = """
- hosts: localhost
  gather_facts: false
  tasks:
    - name: Open the transaction
      ansible.builtin.fail:
        msg: >-
          transaction failed for {{ cvmfs_repository }}
          with {{ lookup('file', cvmfs_publisher_rgw_secret_key_file) }}
"""
PLAYBOOK_SLOW = """
- hosts: localhost
  gather_facts: false
  tasks:
    - ansible.builtin.command: sleep 60.{{ cvmfs_repository | length }}7531
"""


def make_runner(project, playbook_text, **settings):
    (project["root"] / "playbooks" / "sync_repository.yml").write_text(playbook_text)
    config = load(str(project["config_path"]), environ={})
    section = dict(config.section("ansible"),
                   env={"ANSIBLE_LOCALHOST_WARNING": "False", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False"},
                   **settings)
    secrets = secret_values(section["extravars_files"], [config["amqp.password_file"]])
    return PlaybookRunner(section, str(project["tmp"] / "state"), secrets=secrets)


def test_successful_run_leaves_nothing_behind(project):
    runner = make_runner(project, PLAYBOOK_OK)
    out = project["tmp"] / "out.json"
    result = runner.run("sync_playbook", {"cvmfs_repository": "alice.infn.it", "cvmfs_sync_keys": ["cvmfs/a b"],
                                          "out": str(out)}, "changes-alice")
    assert result.ok, result.error
    assert json.loads(out.read_text()) == {"repo": "alice.infn.it", "keys": ["cvmfs/a b"],
                                           "endpoint": "http://127.0.0.1:1"}  # the vars file was passed
    assert os.listdir(runner.runs_dir) == [] and sorted(os.listdir(runner.failed_dir)) == []


def test_failed_run_is_kept_scrubbed_and_reports_the_task(project, monkeypatch):
    monkeypatch.setenv("SOME_TOKEN", "s3cr3t-amqp-password")  # a secret in the daemon's environment
    runner = make_runner(project, PLAYBOOK_FAIL, keep_failed_runs=1)
    result = runner.run("sync_playbook", {"cvmfs_repository": "alice.infn.it"}, "changes-alice")
    assert result.outcome == "failed" and result.rc != 0
    assert result.error.startswith("Open the transaction: transaction failed for alice.infn.it")
    assert "rgw-secret-value-123" not in result.error and "********" in result.error
    kept = Path(result.kept)
    assert kept.is_dir() and os.listdir(runner.runs_dir) == []
    everything = "".join(p.read_text(errors="replace") for p in kept.rglob("*") if p.is_file())
    assert "rgw-secret-value-123" not in everything
    assert "s3cr3t-amqp-password" not in everything
    assert "transaction failed" in everything  # the useful part stays
    command = json.loads(next(kept.glob("artifacts/*/command")).read_text())
    assert "SOME_TOKEN" not in json.dumps(command) and command["command"]
    again = runner.run("sync_playbook", {"cvmfs_repository": "alice.infn.it"}, "changes-alice")
    assert sorted(os.listdir(runner.failed_dir)) == [os.path.basename(again.kept)]  # only the last N


def test_timeout_kills_the_run(project):
    runner = make_runner(project, PLAYBOOK_SLOW, timeout=3)
    started = time.monotonic()
    result = runner.run("sync_playbook", {"cvmfs_repository": "alice.infn.it"}, "changes-alice")
    assert result.outcome == "timeout"
    assert time.monotonic() - started < 50
    _wait_gone("sleep 60.137531", "the timed-out run's module")


def test_cancel(project):
    runner = make_runner(project, PLAYBOOK_SLOW)
    deadline = time.monotonic() + 3
    result = runner.run("sync_playbook", {"cvmfs_repository": "alice.infn.it"}, "changes-alice",
                        cancel=lambda: time.monotonic() > deadline)
    assert result.outcome == "canceled"
    _wait_gone("sleep 60.137531", "the cancelled run's module")


@pytest.mark.parametrize("status, rc, stats, expected", [
    ("successful", 0, {"ok": {"localhost": 2}}, "successful"),
    ("successful", 0, {"failures": {"localhost": 1}}, "failed"),
    ("successful", 0, {"dark": {"localhost": 1}}, "failed"),
    ("successful", 2, {}, "failed"),
    ("failed", 2, {}, "failed"),
    ("timeout", 254, None, "timeout"),
    ("", None, None, "error"),
])
def test_outcome(status, rc, stats, expected):
    assert outcome_of(status, rc, stats) == expected


ISOLATIONS = ["pid-namespace", "subreaper"]


def _processes_with(marker):
    """Live processes whose command line holds ``marker`` (PIDs inside a run's namespace differ from ours)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline and _alive(int(proc.name)):
                found.append(int(proc.name))
    return found


def _wait_gone(marker, what):
    deadline = time.monotonic() + 20
    while _processes_with(marker):
        assert time.monotonic() < deadline, "%s: %s still running" % (what, _processes_with(marker))
        time.sleep(0.1)


def _wait_running(marker):
    deadline = time.monotonic() + 20
    while not _processes_with(marker):
        assert time.monotonic() < deadline, "the fake playbook did not start"
        time.sleep(0.1)


def _fake_playbook(tmp_path, body):
    """A stand-in for ansible-playbook that leaves a process in a session of its own, as ansible's workers do."""
    marker = "%d.%d" % (os.getpid(), time.monotonic_ns() % 10**9)
    path = tmp_path / "fake-ansible-playbook"
    path.write_text("#!/bin/sh\nsetsid sleep 3%s &\n%s\n" % (marker, body))
    path.chmod(0o755)
    return path, "sleep 3" + marker


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_no_process_of_a_run_outlives_a_killed_daemon(tmp_path, monkeypatch, isolation):
    """kill -9 of the daemon takes the whole run down, even what left the process group with setsid()."""
    monkeypatch.setenv("CVMFS_PUBLISHER_RUN_ISOLATION", isolation)
    fake_playbook, marker = _fake_playbook(tmp_path, "wait")
    guard = "import sys; from cvmfs_publisher_consumer.guard import main; sys.exit(main(%r))" % str(fake_playbook)
    daemon = subprocess.Popen([sys.executable, "-c", (
        "import os, subprocess, sys, time\n"
        "env = dict(os.environ, CVMFS_PUBLISHER_DAEMON_PID=str(os.getpid()))\n"
        "subprocess.Popen([sys.executable, '-c', %r], env=env, start_new_session=True)\n"
        "time.sleep(300)\n") % guard])
    _wait_running(marker)
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait()
    _wait_gone(marker, "the run outlived its daemon")


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_a_killed_playbook_is_named_and_takes_its_orphans_along(project, tmp_path, monkeypatch, isolation):
    monkeypatch.setenv("CVMFS_PUBLISHER_RUN_ISOLATION", isolation)
    fake_playbook, marker = _fake_playbook(tmp_path, "sleep 1\nkill -9 $$")
    runner = make_runner(project, PLAYBOOK_OK, playbook_bin=str(fake_playbook))
    result = runner.run("sync_playbook", {"cvmfs_repository": "alice.infn.it"}, "changes-alice")
    assert (result.outcome, result.error) == ("killed", "ansible-playbook killed by signal 9 (SIGKILL)")
    assert not _processes_with(marker), "an orphan of the run survived it"


def test_guard_reports_how_the_playbook_ended(tmp_path, monkeypatch):
    report = tmp_path / "report.json"
    monkeypatch.setenv("CVMFS_PUBLISHER_RUN_REPORT", str(report))
    for body, code, expected in (("exit 3", 3, {"exit": 3}), ("kill -TERM $$", 128 + 15, {"signal": 15})):
        fake_playbook, _marker = _fake_playbook(tmp_path, body)
        guard = subprocess.run([sys.executable, "-c", "import sys; from cvmfs_publisher_consumer.guard import main; "
                                "sys.exit(main(%r))" % str(fake_playbook)], capture_output=True, text=True)
        assert guard.returncode == code, guard.stderr
        assert json.loads(report.read_text()) == dict(expected, isolation="pid-namespace")


def test_a_module_that_dies_is_reported_as_such(project):
    playbook = PLAYBOOK_SLOW.replace("ansible.builtin.command: sleep 60.{{ cvmfs_repository | length }}7531",
                                     "ansible.builtin.shell: kill -9 $PPID; sleep 5")
    assert "kill -9" in playbook
    result = make_runner(project, playbook).run("sync_playbook", {"cvmfs_repository": "a.infn.it"}, "changes-a")
    assert result.outcome == "failed"
    assert "the module process died, killed by signal 9 (SIGKILL), before reporting a result" in result.error, \
        result.error
    assert "deserialization" not in result.error


def test_a_module_that_dies_in_a_step_whose_errors_are_handled_is_still_the_error(project):
    """The repository role's batched steps ignore their errors and a last task fails naming them; a module process
    that died there must still be reported as such, not as the last task's summary."""
    playbook = PLAYBOOK_SLOW.replace("ansible.builtin.command: sleep 60.{{ cvmfs_repository | length }}7531",
                                     "ansible.builtin.shell: kill -9 $PPID; sleep 5\n      ignore_errors: true")
    playbook += "\n    - ansible.builtin.fail:\n        msg: a step failed\n"
    assert "ignore_errors" in playbook
    result = make_runner(project, playbook).run("sync_playbook", {"cvmfs_repository": "a.infn.it"}, "changes-a")
    assert result.outcome == "failed"
    assert "the module process died, killed by signal 9 (SIGKILL), before reporting a result" in result.error, \
        result.error


@pytest.mark.parametrize("res, expected", [
    ({"msg": "Module result deserialization failed: No start of json char found", "rc": 137},
     "the module process died, killed by signal 9 (SIGKILL), before reporting a result"),
    ({"msg": "MODULE FAILURE\nSee stdout/stderr for the exact error", "rc": -15},
     "the module process died, killed by signal 15 (SIGTERM), before reporting a result"),
    ({"msg": "Module result deserialization failed.", "rc": 1},
     "the module process died with exit code 1 without reporting a result"),
    ({"msg": "lease busy", "rc": 137}, ""),
])
def test_module_death(res, expected):
    assert module_death(res) == expected


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


PLAYBOOK_ENV = """
- hosts: localhost
  gather_facts: false
  tasks:
    - ansible.builtin.copy:
        dest: "{{ out }}"
        content: "{{ {'pipelining': lookup('config', 'ANSIBLE_PIPELINING'),
                      'gathering': lookup('config', 'DEFAULT_GATHERING')} | to_json }}"
"""


@pytest.mark.parametrize("operator_env, expected", [
    ({}, {"pipelining": False, "gathering": "explicit"}),
    ({"ANSIBLE_PIPELINING": "True"}, {"pipelining": True, "gathering": "explicit"}),
])
def test_runs_without_pipelining_and_gathers_no_facts_unless_told(project, operator_env, expected):
    runner = make_runner(project, PLAYBOOK_ENV)
    runner.settings["env"] = dict(runner.settings["env"], **operator_env)
    out = project["tmp"] / "env.json"
    result = runner.run("sync_playbook", {"cvmfs_repository": "alice.infn.it", "out": str(out)}, "changes-alice")
    assert result.ok, result.error
    assert json.loads(out.read_text()) == expected
