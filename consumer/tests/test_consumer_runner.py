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
from cvmfs_publisher_consumer.runner import PlaybookRunner, outcome_of, secret_values

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
    - ansible.builtin.command: sleep 60
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
    assert os.listdir(runner.runs_dir) == [] and runner.failed_runs() == []


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
    assert runner.failed_runs() == [os.path.basename(again.kept)]  # only the last N


def test_timeout_kills_the_run(project):
    runner = make_runner(project, PLAYBOOK_SLOW, timeout=3)
    started = time.monotonic()
    result = runner.run("sync_playbook", {"cvmfs_repository": "alice.infn.it"}, "changes-alice")
    assert result.outcome == "timeout"
    assert time.monotonic() - started < 50


def test_cancel(project):
    runner = make_runner(project, PLAYBOOK_SLOW)
    deadline = time.monotonic() + 3
    result = runner.run("sync_playbook", {"cvmfs_repository": "alice.infn.it"}, "changes-alice",
                        cancel=lambda: time.monotonic() > deadline)
    assert result.outcome == "canceled"


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


def test_guard_kills_the_playbook_when_the_daemon_dies(tmp_path):
    """kill -9 of the daemon takes the whole run down: nothing keeps writing behind a restarted daemon."""
    pid_file = tmp_path / "grandchild.pid"
    fake_playbook = tmp_path / "fake-ansible-playbook"
    fake_playbook.write_text("#!/bin/sh\nsleep 300 &\necho $! > %s\nwait\n" % pid_file)
    fake_playbook.chmod(0o755)
    guard = "import sys; from cvmfs_publisher_consumer.guard import main; sys.exit(main(%r))" % str(fake_playbook)
    daemon = subprocess.Popen([sys.executable, "-c", (
        "import os, subprocess, sys, time\n"
        "env = dict(os.environ, CVMFS_PUBLISHER_DAEMON_PID=str(os.getpid()))\n"
        "subprocess.Popen([sys.executable, '-c', %r], env=env, start_new_session=True)\n"
        "time.sleep(300)\n") % guard])
    deadline = time.monotonic() + 20
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline, "the fake playbook did not start"
        time.sleep(0.1)
    grandchild = int(pid_file.read_text())
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait()
    deadline = time.monotonic() + 20
    while _alive(grandchild):
        assert time.monotonic() < deadline, "the playbook's children outlived the daemon"
        time.sleep(0.1)


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
