"""Faults survived by design: each test breaks one part of the real stack while the daemon publishes, lets it
settle, and asserts zero events lost (bucket listing = published tree), zero half-published revisions, zero
orphan processes of any run, and nothing left in the dead-letter queue for transient causes.

One repository with a persistent topic (the production default) is provisioned once for the whole module: RGW
16.2 starts delivering a new persistent topic's events only after up to 30 s, paid once. Each test uploads under a
prefix of its own and adds a row to the table printed at the end ("fault | tried | lost | half-published |
orphans | recovered in").

"In the transaction" is made observable with a cvmfs_server wrapper that, while a flag file exists, marks and then
sleeps inside ``publish`` (the transaction is open then) before calling the stand-in: long enough for a surviving
orphan to publish after its daemon died, which the published revision log would show.
"""
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from helpers import consumer_e2e, run_playbook, stack_vars_file

REPO_ROOT = Path(__file__).resolve().parents[2]
e2e = consumer_e2e()  # the daemon and bucket helpers of the end-to-end tests
standin, stacklib = e2e.standin, e2e.stacklib
STACK = REPO_ROOT / "devstack" / "stack"
PUBLISH_DELAY = 8          # seconds the slow wrapper holds a transaction open (an orphan would publish after it)
SETTLE_TIMEOUT = 300

pytestmark = pytest.mark.slow


def stack_cmd(*args):
    proc = subprocess.run([str(STACK), *args], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# -- the repository and the daemons ------------------------------------------------------------------------

class Site:
    """The repository shared by the module's tests, and the settings of their daemons."""

    def __init__(self, stack, s3, folder, name):
        self.stack, self.s3, self.folder, self.name = stack, s3, folder, name
        self.fqrn = name + ".infn.it"
        self.publisher_queue, self.dlq = "publisher-" + name, name + ".dlq"
        self.slow_flag, self.in_publish = folder / "slow", folder / "in-publish"
        # `sleep 8.<digits>`: this suite's sleeps, nobody else's (decimal digits only: `sleep` refuses hex letters
        # at once, and the transaction would close before the test looks)
        self.marker = "%d.%d" % (PUBLISH_DELAY, int(name[1:], 16))
        wrapper = folder / "cvmfs_server"
        script = ("#!/bin/sh\nif [ \"$1\" = publish ] && [ -e '%s' ]; then : > '%s'; sleep %s; fi\nexec '%s' \"$@\"\n"
                  % (self.slow_flag, self.in_publish, self.marker, stack["CVMFS_SERVER_BIN"]))
        wrapper.write_text(script)
        wrapper.chmod(0o755)
        self.vars_file = folder / "fault-vars.yml"
        self.vars_file.write_text(yaml.safe_dump({"cvmfs_publisher_cvmfs_server_bin": str(wrapper),
                                                  "cvmfs_publisher_topic_persistent": True}))
        self.daemons = []

    def daemon(self, label, **settings):
        settings = dict({"ansible__extravars_files": [stack_vars_file(), str(self.vars_file)],
                         "sync__max_attempts": 3, "sync__retry_initial_delay": 1, "sync__retry_max_delay": 3,
                         "sync__full_reconcile_interval": 0}, **settings)
        daemon = e2e.DaemonProcess(self.stack, self.folder, "%s-%d" % (label, len(self.daemons)),
                                   self.publisher_queue, self.dlq, ["%s*.infn.it" % self.name], **settings)
        self.daemons.append(daemon)
        return daemon

    def provision(self, short):
        fqrn = short + ".infn.it"
        e2e.seed_keys(self.stack, fqrn, "sub-" + short)
        self.s3.create_bucket(Bucket=short)
        proc = run_playbook("provision_repository.yml", {"cvmfs_repository": fqrn, "cvmfs_subject": "sub-" + short,
                                                         "cvmfs_publisher_topic_persistent": True})
        assert proc.returncode == 0, proc.stdout[-3000:]
        return fqrn

    def upload(self, prefix, count, size=256):
        e2e.upload_many(self.s3, self.name, {"cvmfs/%s/f%03d" % (prefix, i): os.urandom(size) for i in range(count)})

    def lost(self):
        """Objects of the bucket not published as they are, plus published files the bucket no longer has."""
        expected, published = e2e.bucket_files(self.s3, self.name), e2e.published_files(self.stack, self.fqrn)
        return len(set(expected.items()) ^ set(published.items()))

    def revisions(self):
        return len(standin.publish_log(self.stack["CVMFS_STANDIN_ROOT"], self.fqrn))

    def transient_dead_letters(self):
        dead = e2e.drain_queue(self.stack, self.dlq)
        for body, headers in dead:  # put back what an operator must see
            if headers.get("x-cvmfs-publisher-cause") != "transient":
                e2e.publish(self.stack, self.dlq, body, headers)
        return [h for _b, h in dead if h.get("x-cvmfs-publisher-cause") == "transient"]


def run_processes(marker):
    """PIDs of live processes whose environment names ``marker`` (a daemon's state dir, or one run's report file):
    every process of a run inherits CVMFS_PUBLISHER_RUN_REPORT=<state dir>/runs/<run>/run-report.json."""
    found = []
    needle = marker.encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes() and (proc / "stat").read_text().split()[2] != "Z":
                found.append(int(proc.name))
        except (OSError, IndexError):
            continue
    return found


def settle(site, started, *daemons, timeout=SETTLE_TIMEOUT):
    """Wait until the bucket is published; then stop the daemons and count what is left. Returns the row's last
    four cells (lost, half-published, orphans, recovered in)."""
    deadline = time.monotonic() + timeout
    while site.lost() and time.monotonic() < deadline:
        time.sleep(1)
    recovered = time.monotonic() - started
    for daemon in daemons:
        daemon.stop()
    orphans = sum(len(run_processes(str(d.folder / "state") + "/")) for d in daemons)
    half = 1 if standin.in_transaction(site.stack["CVMFS_STANDIN_ROOT"], site.fqrn) else 0
    return site.lost(), half, orphans, "%.0f s" % recovered


def record(fault_table, site, fault, row):
    """Add the fault's row to the table, then hold it to zero lost, zero half-published, zero orphans and no
    transient dead letter left."""
    fault_table.append((fault, 1) + tuple(row))
    assert tuple(row[:3]) == (0, 0, 0), (fault, row)
    assert not site.transient_dead_letters(), fault


def wait_until(check, what, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@pytest.fixture(scope="module")
def site(stack, s3, tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    name = "f" + os.urandom(4).hex()
    site = Site(stack, s3, folder, name)
    site.provision(name)
    # The persistent topic goes live within ~30 s: wait for a first event to be published.
    daemon = site.daemon("warmup").start()
    site.upload("warmup", 1)
    e2e.wait_published(stack, s3, site.fqrn, name, timeout=180)
    daemon.stop()
    yield site
    secrets = e2e.stack_secrets(stack)
    for daemon in site.daemons:
        if daemon.process and daemon.process.poll() is None:
            daemon.kill()
        daemon.assert_no_secret(secrets)


@pytest.fixture
def slow_publish(site):
    site.slow_flag.touch()
    site.in_publish.unlink(missing_ok=True)
    yield
    site.slow_flag.unlink(missing_ok=True)


def wait_in_transaction(site):
    wait_until(site.in_publish.exists, "no run reached publish", timeout=180)
    assert standin.in_transaction(site.stack["CVMFS_STANDIN_ROOT"], site.fqrn), "the transaction is not open"


# -- the faults ------------------------------------------------------------------------------------------

def test_kill_9_of_the_daemon_inside_the_transaction(site, slow_publish, fault_table):
    daemon = site.daemon("kill-daemon").start()
    site.upload("kill-daemon", 20)
    wait_in_transaction(site)
    revisions = site.revisions()
    daemon.kill()
    killed = time.monotonic()
    state = str(daemon.folder / "state") + "/"
    wait_until(lambda: not run_processes(state), "processes of the run outlived the daemon: %s"
               % run_processes(state), timeout=30)
    assert not e2e._processes_mentioning(site.marker)
    time.sleep(max(0.0, killed + PUBLISH_DELAY + 2 - time.monotonic()))  # an orphan would have published by now
    assert site.revisions() == revisions, "a revision was published after the daemon died"
    site.slow_flag.unlink()
    daemon.start()
    row = settle(site, killed, daemon)
    log = standin.publish_log(site.stack["CVMFS_STANDIN_ROOT"], site.fqrn)
    assert [entry["revision"] for entry in log] == list(range(len(log)))  # one after the other, none lost
    record(fault_table, site, "kill -9 daemon in transaction", row)


def test_kill_9_of_the_playbook_inside_the_transaction(site, slow_publish, fault_table):
    daemon = site.daemon("kill-playbook").start()
    site.upload("kill-playbook", 10)
    wait_in_transaction(site)
    state = str(daemon.folder / "state") + "/"
    playbooks = [pid for pid in run_processes(state) if _is_ansible_playbook(pid)]
    [playbook] = [pid for pid in playbooks if _parent(pid) not in playbooks]  # not one of its forked workers
    report = [v for v in _environ(playbook) if v.startswith("CVMFS_PUBLISHER_RUN_REPORT=")][0].split("=", 1)[1]
    site.slow_flag.unlink()
    os.kill(playbook, signal.SIGKILL)
    killed = time.monotonic()
    [failed] = daemon.wait_for(e2e.sync_event("run_failed", site.fqrn), "the killed run was not reported")
    assert failed["error"] == "ansible-playbook killed by signal 9 (SIGKILL)" and failed["outcome"] == "killed"
    wait_until(lambda: not run_processes(report), "processes of the killed run survived it", timeout=30)
    row = settle(site, killed, daemon)
    record(fault_table, site, "kill -9 playbook in transaction", row)


def _environ(pid):
    return (Path("/proc/%d/environ" % pid).read_bytes().decode(errors="replace")).split("\0")


def _parent(pid):
    return int(Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()[1])


def _is_ansible_playbook(pid):
    try:
        argv = Path("/proc/%d/cmdline" % pid).read_bytes().split(b"\0")
    except OSError:
        return False
    return len(argv) > 1 and argv[1].endswith(b"/ansible-playbook")


def test_broker_stopped_mid_burst(site, fault_table):
    daemon = site.daemon("broker").start()
    uploader = threading.Thread(target=site.upload, args=("broker-before", 40))
    uploader.start()
    daemon.wait_for(e2e.sync_event("run_started", site.fqrn), "no sync started")
    stack_cmd("stop", "rabbitmq")
    stopped = time.monotonic()
    try:
        uploader.join()
        site.upload("broker-during", 40)      # RGW keeps these in the persistent topic's queue
    finally:
        stack_cmd("start", "rabbitmq")
    row = settle(site, stopped, daemon)
    record(fault_table, site, "broker stopped mid-burst", row)


def test_radosgw_killed_during_a_sync(site, fault_table):
    daemon = site.daemon("rgw", sync__max_attempts=2).start()
    site.upload("rgw", 30)
    daemon.wait_for(e2e.sync_event("run_started", site.fqrn), "no sync started")
    stack_cmd("stop", "radosgw")
    killed = time.monotonic()
    try:
        daemon.wait_for(lambda e: e.get("event") == "dead_letter" and e.get("repository") == site.fqrn,
                        "the failing messages were never dead-lettered", timeout=180)
    finally:
        stack_cmd("start", "radosgw")
    daemon.wait_for(lambda e: e.get("event") == "dead_letters_cleared" and e.get("repository") == site.fqrn,
                    "the dead letters were not superseded by a full sync", timeout=SETTLE_TIMEOUT)
    row = settle(site, killed, daemon)
    record(fault_table, site, "radosgw killed", row)


def test_openbao_frozen_then_killed_during_provisioning(site, fault_table):
    daemon = site.daemon("openbao", sync__max_attempts=6).start()
    rows = []
    for fault, short in (("frozen", site.name + "b"), ("killed", site.name + "c")):
        fqrn = short + ".infn.it"
        e2e.seed_keys(site.stack, fqrn, "sub-" + short)
        site.s3.create_bucket(Bucket=short)
        bao = stacklib.State(stacklib.Layout(site.stack["DEVSTACK_DIR"])).processes["openbao"]["pid"]
        if fault == "frozen":
            os.kill(bao, signal.SIGSTOP)
        else:
            stack_cmd("stop", "openbao")
        try:
            e2e.publish(site.stack, site.publisher_queue, "%s,sub-%s,%s,P" % (short, short, fqrn))
            if fault == "frozen":
                daemon.wait_for(lambda e: e.get("event") == "run_started" and e.get("repository") == fqrn,  # noqa: B023
                                "no provisioning run started")
                time.sleep(3)
            else:
                daemon.wait_for(lambda e: e.get("event") == "run_failed" and e.get("repository") == fqrn,  # noqa: B023
                                "provisioning did not fail without OpenBao")
        finally:
            if fault == "frozen":
                os.kill(bao, signal.SIGCONT)
            else:
                stack_cmd("start", "openbao")  # the dev server starts empty: `start` stores the seeded keys again
        back = time.monotonic()
        daemon.wait_for(lambda e: e.get("event") == "run_succeeded" and e.get("repository") == fqrn,  # noqa: B023
                        "provisioning never succeeded after OpenBao came back", timeout=SETTLE_TIMEOUT)
        provisioned = (Path(site.stack["CVMFS_STANDIN_ROOT"]) / "etc/cvmfs/repositories.d" / fqrn).is_dir()
        rows.append(["OpenBao %s" % fault, 1, 0 if provisioned else 1, 0, None, "%.0f s" % (time.monotonic() - back)])
    daemon.stop()
    orphans = len(run_processes(str(daemon.folder / "state") + "/"))
    fault_table.extend(tuple(row[:4] + [orphans] + row[5:]) for row in rows)
    assert all(row[2] == 0 for row in rows) and orphans == 0, rows
    assert not site.transient_dead_letters()


def test_gateway_lease_held_elsewhere(site, fault_table):
    gateway = standin.Local(site.stack["CVMFS_STANDIN_ROOT"], site.fqrn).gateway()
    with gateway.locked():
        gateway.save_leases(gateway.leases() + [{"token": "elsewhere", "path": "", "owner": "/elsewhere/spool",
                                                 "publisher": "other-host", "since": time.time()}])
    daemon = site.daemon("lease").start()
    try:
        site.upload("lease", 10)
        daemon.wait_for(e2e.sync_event("run_started", site.fqrn), "no sync started")
        time.sleep(5)
        assert site.lost(), "published although the lease was held elsewhere"
    finally:
        with gateway.locked():
            gateway.save_leases([lease for lease in gateway.leases() if lease["token"] != "elsewhere"])
    released = time.monotonic()
    row = settle(site, released, daemon)
    record(fault_table, site, "gateway lease held elsewhere", row)


def test_two_daemons_and_the_active_one_killed(site, fault_table):
    first, second = site.daemon("two").start(), site.daemon("two").start()
    site.upload("two-a", 40)
    wait_until(lambda: first.runs(site.fqrn) or second.runs(site.fqrn), "no daemon started a sync")
    active, standby = (first, second) if first.runs(site.fqrn) else (second, first)
    killed_at, killed = time.time(), time.monotonic()
    active.kill()
    site.upload("two-b", 10)
    row = settle(site, killed, standby)
    intervals = sorted(e2e._run_intervals(active, site.fqrn, killed_at) + e2e._run_intervals(standby, site.fqrn, None))
    overlaps = sum(1 for (_s, end), (start, _e) in zip(intervals, intervals[1:]) if start < end)
    orphans = row[2] + len(run_processes(str(active.folder / "state") + "/"))
    row = row[:2] + (orphans, row[3])
    record(fault_table, site, "two daemons, active one killed", row)
    assert standby.runs(site.fqrn), "the standby daemon never took over"
    assert overlaps == 0, intervals
