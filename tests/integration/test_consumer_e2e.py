"""End to end: the cvmfs-publisher daemon on the local stack (real RGW notifications, real RabbitMQ, real
ansible-runner runs of the collection's playbooks, the cvmfs_server stand-in).

Each test runs its own daemon(s) with its own provisioning queue, dead-letter queue and repository names, and
consumes only its own repositories (``repositories.include``), so tests never see each other's events.
Every daemon's log and kept failed runs are checked for secrets when it stops.
"""
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pika
import pytest
import yaml

from helpers import amqp_parameters, daemon_amqp_settings, stack_vars_file

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "devstack"))
import standin  # noqa: E402  (the stand-in's read API for tests)
import stacklib  # noqa: E402

CLI = REPO_ROOT / ".venv" / "bin" / "cvmfs-publisher"
PREFIX = "cvmfs/"
CONVERGE_TIMEOUT = 600
TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar")

pytestmark = pytest.mark.slow


# -- the stack ---------------------------------------------------------------------------------------------

def amqp_connection(stack):
    return pika.BlockingConnection(amqp_parameters(stack))


def publish(stack, queue, body, headers=None):
    connection = amqp_connection(stack)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", queue, body if isinstance(body, bytes) else body.encode(),
                              pika.BasicProperties(delivery_mode=2, headers=headers), mandatory=True)
    finally:
        connection.close()


def drain_queue(stack, queue):
    """Every message of ``queue`` as (body, headers), consumed."""
    messages = []
    connection = amqp_connection(stack)
    try:
        channel = connection.channel()
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return messages
            messages.append((body, properties.headers or {}))
    finally:
        connection.close()


def rabbitmqctl(stack, *args):
    env = stacklib.rabbitmq_env(stacklib.Layout(stack["DEVSTACK_DIR"]))
    subprocess.run([stacklib.RABBITMQCTL, *args], env=env, check=True, capture_output=True, timeout=180)


def seed_keys(stack, fqrn, subject):
    subprocess.run([str(REPO_ROOT / "devstack" / "stack"), "seed-keys", fqrn, "--subject", subject], check=True,
                   capture_output=True, env=dict(os.environ, DEVSTACK_DIR=stack["DEVSTACK_DIR"]), timeout=120)


def stack_secrets(stack):
    folder = Path(stack["DEVSTACK_DIR"]) / "secrets"
    return [p.read_text().strip() for p in folder.iterdir() if p.is_file() and len(p.read_text().strip()) >= 6]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the bucket and the published tree --------------------------------------------------------------------

def upload_many(s3, bucket, objects, workers=16):
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda item: s3.put_object(Bucket=bucket, Key=item[0], Body=item[1]), objects.items()))


def tarball(members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(content), 0o644
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def tarball_target(path):
    for suffix in TARBALL_SUFFIXES:
        if path.endswith(suffix) and len(path) > len(suffix):
            return path[:-len(suffix)]
    return None


def bucket_files(s3, bucket):
    """{path in the repository: sha256} that the bucket's ``cvmfs/`` content should publish."""
    expected = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=PREFIX):
        for obj in page.get("Contents", []):
            path = obj["Key"][len(PREFIX):]
            body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            target = tarball_target(path)
            if target is None:
                expected[path] = hashlib.sha256(body).hexdigest()
                continue
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                for member in tar.getmembers():
                    if member.isfile():
                        name = member.name[2:] if member.name.startswith("./") else member.name
                        expected["%s/%s" % (target, name)] = hashlib.sha256(tar.extractfile(member).read()).hexdigest()
    return expected


def published_files(stack, fqrn):
    try:
        tree = standin.published_tree(stack["CVMFS_STANDIN_ROOT"], fqrn)
    except Exception:  # noqa: BLE001 -- nothing published yet
        return {}
    return {path: value for path, value in tree.items() if value != "dir"}


def wait_published(stack, s3, fqrn, bucket, timeout=CONVERGE_TIMEOUT):
    expected = bucket_files(s3, bucket)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if published_files(stack, fqrn) == expected:
            return expected
        time.sleep(1)
    published = published_files(stack, fqrn)
    missing = sorted(set(expected) - set(published))[:10]
    extra = sorted(set(published) - set(expected))[:10]
    pytest.fail("published tree of %s never matched the bucket: %d expected, %d published; missing %s; extra %s"
                % (fqrn, len(expected), len(published), missing, extra))


def assert_transaction_closes(stack, fqrn, timeout=60):
    """No transaction is left open. The stand-in shows a new revision a moment before it drops the transaction
    lock, so a tree that just matched may still have its transaction open: a bound on polling, not a threshold."""
    deadline = time.monotonic() + timeout
    while standin.in_transaction(stack["CVMFS_STANDIN_ROOT"], fqrn):
        assert time.monotonic() < deadline, "%s is still in a transaction %ss after publishing" % (fqrn, timeout)
        time.sleep(0.2)


# -- the daemon ------------------------------------------------------------------------------------------

class DaemonProcess:
    """One ``cvmfs-publisher run`` with its own state dir and log file."""

    def __init__(self, stack, folder, name, publisher_queue, dead_letter_queue, include, **settings):
        self.stack = stack
        self.folder = folder / name
        self.folder.mkdir(parents=True)
        self.log_path = self.folder / "daemon.log"
        self.metrics_port = free_port()
        # Synchronous topics: a new persistent topic (the stack's default, as in production) delivers its first
        # events only after up to 30 s. These tests are about the daemon; tests/faults uses persistent topics.
        synchronous_topics = self.folder / "synchronous-topics.yml"
        synchronous_topics.write_text("cvmfs_publisher_topic_persistent: false\n")
        config = {
            "amqp": dict(daemon_amqp_settings(stack), reconnect_initial_delay=0.5, reconnect_max_delay=5),
            "queues": {"publisher": publisher_queue, "dead_letter": dead_letter_queue},
            "repositories": {"config_dir": str(Path(stack["CVMFS_STANDIN_ROOT"]) / "etc/cvmfs/repositories.d"),
                             "include": include, "rescan_interval": 2},
            # No periodic full sync: its random first time would make the run counts below flaky.
            "sync": {"retry_initial_delay": 1, "retry_max_delay": 4, "max_attempts": 3, "full_reconcile_interval": 0},
            "ansible": {"project_dir": str(REPO_ROOT), "extravars_files": [stack_vars_file(), str(synchronous_topics)],
                        "env": {"ANSIBLE_CONFIG": str(REPO_ROOT / "ansible.cfg")}},
            "state_dir": str(self.folder / "state"),
            "metrics": {"port": self.metrics_port},
            "shutdown_grace": 20,
        }
        for dotted, value in settings.items():
            section, key = dotted.split("__")
            config.setdefault(section, {})[key] = value
        self.config_path = self.folder / "config.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.process = None

    def start(self):
        log = open(self.log_path, "a")
        env = dict(os.environ, PATH="%s:%s" % (CLI.parent, os.environ.get("PATH", "")))
        self.process = subprocess.Popen([str(CLI), "-c", str(self.config_path), "run"], stdout=log,
                                        stderr=subprocess.STDOUT, env=env)
        log.close()
        self.wait_for(lambda e: e.get("event") == "connected", "the daemon never connected")
        return self

    def events(self):
        events = []
        for line in self.log_path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                events.append({"event": "non-json", "line": line})
        return events

    def wait_for(self, predicate, what, timeout=CONVERGE_TIMEOUT, count=1):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            matches = [e for e in self.events() if predicate(e)]
            if len(matches) >= count:
                return matches
            if self.process and self.process.poll() is not None:
                pytest.fail("%s: the daemon exited with %s; log tail:\n%s" % (
                    what, self.process.returncode, self.log_path.read_text()[-3000:]))
            time.sleep(0.3)
        pytest.fail("%s (after %ss); log tail:\n%s" % (what, timeout, self.log_path.read_text()[-3000:]))

    def runs(self, fqrn, modes=("changes", "full"), event="run_started"):
        """The sync runs (by default) of ``fqrn``: a big batch runs as ``full`` (sync.full_sync_threshold)."""
        return [e for e in self.events() if e.get("event") == event and e.get("repository") == fqrn
                and e.get("mode") in modes]

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            assert self.process.wait(timeout=120) == 0, self.log_path.read_text()[-3000:]

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def assert_no_secret(self, secrets):
        places = [self.log_path] + [p for p in (self.folder / "state").rglob("*") if p.is_file()]
        for path in places:
            text = path.read_text(errors="replace")
            for secret in secrets:
                assert secret not in text, "a secret appears in %s" % path
        non_json = [e["line"] for e in self.events() if e.get("event") == "non-json"]
        assert not non_json, "log lines that are not JSON: %s" % non_json[:3]


@pytest.fixture
def daemons(stack, tmp_path, unique_name):
    started = []
    names = {"publisher": "publisher-" + unique_name, "dlq": unique_name + ".dlq"}

    def make(name="daemon", include=None, **settings):
        daemon = DaemonProcess(stack, tmp_path, name, names["publisher"], names["dlq"],
                               include or ["%s*.infn.it" % unique_name], **settings)
        started.append(daemon)
        return daemon

    make.queues = names
    yield make
    secrets = stack_secrets(stack)
    for daemon in started:
        if daemon.process and daemon.process.poll() is None:
            daemon.stop()
    for daemon in started:
        daemon.assert_no_secret(secrets)


def provision(stack, s3, daemon, short, kind="P"):
    """What the dashboard does: keys in Vault, then a message on the publisher queue; the bucket exists."""
    fqrn = short + ".infn.it"
    seed_keys(stack, fqrn, "sub-" + short)
    s3.create_bucket(Bucket=short)
    publish(stack, daemon_queue(daemon), "%s,sub-%s,%s,%s" % (short, short, fqrn, kind))
    daemon.wait_for(lambda e: e.get("event") == "run_succeeded" and e.get("mode") == "provision"
                    and e.get("repository") == fqrn, "provisioning of %s never succeeded" % fqrn)
    daemon.wait_for(lambda e: e.get("event") == "consuming" and e.get("queue") == short,
                    "the new repository's queue was never consumed")
    return fqrn


def sync_event(name, fqrn):
    """A predicate for wait_for: event ``name`` of a sync run (changes or full) of ``fqrn``."""
    return lambda e: e.get("event") == name and e.get("repository") == fqrn and e.get("mode") in ("changes", "full")


def daemon_queue(daemon):
    return yaml.safe_load(daemon.config_path.read_text())["queues"]["publisher"]


# -- the tests -------------------------------------------------------------------------------------------

@pytest.mark.tls
def test_provisioning_then_tree_tarball_and_deletions_are_published(stack, s3, daemons, unique_name):
    daemon = daemons().start()
    fqrn = provision(stack, s3, daemon, unique_name)
    assert (Path(stack["CVMFS_STANDIN_ROOT"]) / "etc/cvmfs/repositories.d" / fqrn).is_dir()

    tree = {"cvmfs/README": b"top\n", "cvmfs/sw/v1/bin/tool": b"#!/bin/sh\necho v1\n",
            "cvmfs/sw/v1/lib/deep/er/libx.so": b"\x7fELF" + bytes(range(200)),
            "cvmfs/data/with space/file+plus.txt": b"odd names\n"}
    tree["cvmfs/pkgs/bundle.tar.gz"] = tarball({"bin/run": b"run\n", "share/doc/a.txt": b"doc\n"})
    upload_many(s3, unique_name, tree)
    published = wait_published(stack, s3, fqrn, unique_name)
    assert "pkgs/bundle/share/doc/a.txt" in published and "sw/v1/lib/deep/er/libx.so" in published

    s3.delete_object(Bucket=unique_name, Key="cvmfs/sw/v1/bin/tool")
    s3.delete_object(Bucket=unique_name, Key="cvmfs/pkgs/bundle.tar.gz")
    published = wait_published(stack, s3, fqrn, unique_name)
    assert "sw/v1/bin/tool" not in published and not any(p.startswith("pkgs/bundle/") for p in published)
    assert_transaction_closes(stack, fqrn)
    assert not drain_queue(stack, daemons.queues["dlq"])


def test_a_burst_of_1000_uploads_is_published_in_at_most_10_runs(stack, s3, daemons, unique_name):
    daemon = daemons().start()
    fqrn = provision(stack, s3, daemon, unique_name)
    upload_many(s3, unique_name, {"cvmfs/burst/%03d/f%04d" % (i % 37, i): b"%d\n" % i for i in range(1000)})
    wait_published(stack, s3, fqrn, unique_name)
    runs = daemon.runs(fqrn)
    assert 1 <= len(runs) <= 10, [r.get("keys") for r in runs]
    daemon.wait_for(sync_event("run_succeeded", fqrn), "runs did not finish", count=len(runs))
    assert sum(r["keys"] for r in runs) >= 1000


def holding_publish(stack, tmp_path):
    """(vars file, hold marker): a cvmfs_server that, while the marker exists, sleeps in ``publish`` (with the
    transaction open) instead of publishing; everything else goes to the stand-in."""
    marker = tmp_path / "hold-publish"
    wrapper = tmp_path / "cvmfs_server_holding_publish"
    wrapper.write_text('#!/bin/sh\nif [ "$1" = publish ] && [ -e %s ]; then sleep 300; fi\nexec %s "$@"\n'
                       % (marker, stack["CVMFS_SERVER_BIN"]))
    wrapper.chmod(0o755)
    extra = tmp_path / "holding-publish.yml"
    extra.write_text("cvmfs_publisher_cvmfs_server_bin: %s\n" % wrapper)
    return str(extra), marker


def test_kill_9_during_a_sync_then_restart_loses_nothing(stack, s3, daemons, unique_name, tmp_path):
    extra, hold = holding_publish(stack, tmp_path)
    daemon = daemons(ansible__extravars_files=[stack_vars_file(), extra]).start()
    fqrn = provision(stack, s3, daemon, unique_name)
    hold.touch()
    revision = standin.current_revision(stack["CVMFS_STANDIN_ROOT"], fqrn)
    upload_many(s3, unique_name, {"cvmfs/first/f%03d" % i: os.urandom(2048) for i in range(300)})
    daemon.wait_for(sync_event("run_started", fqrn), "no sync started")
    deadline = time.monotonic() + CONVERGE_TIMEOUT
    while not standin.in_transaction(stack["CVMFS_STANDIN_ROOT"], fqrn):
        assert time.monotonic() < deadline, "the sync never opened its transaction"
        time.sleep(0.2)
    daemon.kill()
    assert standin.in_transaction(stack["CVMFS_STANDIN_ROOT"], fqrn), "killed with the transaction open"
    assert standin.current_revision(stack["CVMFS_STANDIN_ROOT"], fqrn) == revision, "killed before publishing"
    hold.unlink()
    state = str(daemon.folder / "state")
    deadline = time.monotonic() + 30
    while _processes_mentioning(state):
        assert time.monotonic() < deadline, "the run outlived the killed daemon: %s" % _processes_mentioning(state)
        time.sleep(0.5)
    upload_many(s3, unique_name, {"cvmfs/second/f%03d" % i: os.urandom(512) for i in range(50)})
    daemon.start()
    wait_published(stack, s3, fqrn, unique_name)
    assert_transaction_closes(stack, fqrn)


def _processes_mentioning(text):
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                status = (proc / "stat").read_text().split()[2]
            except OSError:
                continue
            if text in cmdline and status != "Z":
                found.append(cmdline[:200])
    return found


def test_rabbitmq_restart_during_a_burst(stack, s3, daemons, unique_name):
    daemon = daemons().start()
    fqrn = provision(stack, s3, daemon, unique_name)
    upload_many(s3, unique_name, {"cvmfs/before/f%03d" % i: b"%d" % i for i in range(300)})
    daemon.wait_for(sync_event("run_started", fqrn), "no sync started")
    rabbitmqctl(stack, "stop_app")
    time.sleep(3)
    rabbitmqctl(stack, "start_app")
    daemon.wait_for(lambda e: e.get("event") == "disconnected", "the daemon never noticed the restart")
    daemon.wait_for(lambda e: e.get("event") == "connected", "the daemon did not reconnect", count=2)
    daemon.wait_for(lambda e: e.get("event") == "consuming" and e.get("queue") == unique_name,
                    "the repository queue was not consumed again", count=2)
    upload_many(s3, unique_name, {"cvmfs/after/f%03d" % i: b"%d" % i for i in range(20)})
    wait_published(stack, s3, fqrn, unique_name)
    assert_transaction_closes(stack, fqrn)


def test_malformed_messages_are_dead_lettered_hostile_records_refused_alone_while_serving(stack, s3, daemons,
                                                                                          unique_name):
    daemon = daemons().start()
    fqrn = provision(stack, s3, daemon, unique_name)
    publisher_queue = daemons.queues["publisher"]
    publish(stack, publisher_queue, "alice,sub,alice.infn.it")
    publish(stack, publisher_queue, '{"version": 1, "repository": "x.infn.it", "kind": ')
    publish(stack, publisher_queue, "alice,sub,../../etc.infn.it,P")

    def event(key, bucket=unique_name):
        return json.dumps({"Records": [{"eventName": "ObjectCreated:Put", "s3": {
            "bucket": {"name": bucket}, "object": {"key": key, "size": 1}}}]})
    publish(stack, unique_name, event("cvmfs/../../etc/passwd"))
    publish(stack, unique_name, event("cvmfs/x", bucket="nosuchbucket-" + unique_name))
    publish(stack, unique_name, b"\x00not json")
    publish(stack, unique_name, event("elsewhere/x"))          # outside the prefix: logged and acked

    s3.put_object(Bucket=unique_name, Key="cvmfs/still/serving.txt", Body=b"yes\n")
    wait_published(stack, s3, fqrn, unique_name)
    daemon.wait_for(lambda e: e.get("event") == "dead_letter", "not all dead-lettered", count=4)
    dead = drain_queue(stack, daemons.queues["dlq"])
    reasons = sorted(headers["x-cvmfs-publisher-reason"] for _body, headers in dead)
    assert len(dead) == 4, reasons
    for expected in ("4 comma-separated fields", "provisioning message is not valid JSON",
                     "invalid repository name '../../etc.infn.it'", "event is not valid JSON"):
        assert any(expected in reason for reason in reasons), (expected, reasons)
    origins = {headers["x-cvmfs-publisher-queue"] for _body, headers in dead}
    assert origins == {publisher_queue, unique_name}
    # Records are judged one by one: the hostile key is refused (logged, counted), the unknown bucket ignored.
    refused = [e for e in daemon.events() if e.get("event") == "object_refused"]
    assert [(e["repository"], e["key"], e["category"]) for e in refused] == [(fqrn, "cvmfs/../../etc/passwd", "key")]
    assert "'..' path segment" in refused[0]["reason"]
    messages = [e.get("message", "") for e in daemon.events() if e.get("event") == "ignored"]
    assert any("outside the prefix" in m for m in messages) and any("unknown bucket 'nosuchbucket-" in m
                                                                    for m in messages)


def test_two_daemons_never_sync_one_repository_at_once_and_one_takes_over(stack, s3, daemons, unique_name):
    first = daemons("first").start()
    fqrn = provision(stack, s3, first, unique_name)
    second = daemons("second").start()
    second.wait_for(lambda e: e.get("event") == "consuming" and e.get("queue") == unique_name, "second not consuming")
    upload_many(s3, unique_name, {"cvmfs/a/f%03d" % i: b"%d" % i for i in range(200)})
    wait_published(stack, s3, fqrn, unique_name)
    active = first if first.runs(fqrn) else second
    standby = second if active is first else first
    assert not standby.runs(fqrn), "single-active-consumer: only one daemon receives the events"

    runs_before = len(active.runs(fqrn))  # counted before the upload: its run may start before the next line
    upload_many(s3, unique_name, {"cvmfs/b/f%03d" % i: b"%d" % i for i in range(200)})
    active.wait_for(sync_event("run_started", fqrn), "no second sync", count=runs_before + 1)
    killed_at = time.time()
    active.kill()
    upload_many(s3, unique_name, {"cvmfs/c/f%03d" % i: b"%d" % i for i in range(50)})
    wait_published(stack, s3, fqrn, unique_name)
    assert standby.runs(fqrn), "the standby daemon never took over"
    assert_transaction_closes(stack, fqrn)
    intervals = _run_intervals(active, fqrn, killed_at) + _run_intervals(standby, fqrn, None)
    intervals.sort()
    for (_start_a, end_a), (start_b, _end_b) in zip(intervals, intervals[1:]):
        assert start_b >= end_a, "two syncs of %s overlapped: %s" % (fqrn, intervals)


def _timestamp(event):
    import datetime
    return datetime.datetime.strptime(event["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def _run_intervals(daemon, fqrn, killed_at):
    """(start, end) of each run of ``fqrn``; a run cut by kill -9 ends when its daemon died."""
    intervals, start = [], None
    for event in daemon.events():
        if event.get("repository") != fqrn or event.get("mode") == "provision":
            continue
        if event.get("event") == "run_started":
            start = _timestamp(event)
        elif event.get("event") in ("run_succeeded", "run_failed", "run_interrupted") and start is not None:
            intervals.append((start, _timestamp(event)))
            start = None
    if start is not None:
        intervals.append((start, killed_at or time.time()))
    return intervals


def test_failed_runs_retry_then_dead_letter_and_keep_no_secret(stack, s3, daemons, unique_name, tmp_path):
    daemon = daemons().start()
    fqrn = provision(stack, s3, daemon, unique_name)
    daemon.stop()
    broken = tmp_path / "broken-endpoint.yml"
    broken.write_text("cvmfs_publisher_rgw_endpoint: http://127.0.0.1:9\n")
    failing = daemons("failing", ansible__extravars_files=[stack_vars_file(), str(broken)],
                      ansible__verbosity=3, sync__max_attempts=2).start()
    s3.put_object(Bucket=unique_name, Key="cvmfs/never.txt", Body=b"x")
    failing.wait_for(sync_event("run_failed", fqrn), "the sync never failed", count=2)
    deadline = time.monotonic() + 60
    dead = []
    while not dead and time.monotonic() < deadline:
        dead = drain_queue(stack, daemons.queues["dlq"])
        time.sleep(0.5)
    assert len(dead) == 1
    headers = dead[0][1]
    assert headers["x-cvmfs-publisher-attempts"] == 2
    assert headers["x-cvmfs-publisher-reason"].startswith("changes run failed 2 times; last error: ")
    kept = list((failing.folder / "state" / "failed-runs").iterdir())
    assert kept, "failed runs are kept for debugging"
    status = json.loads(subprocess.run([str(CLI), "-c", str(failing.config_path), "status", "--json"],
                                       capture_output=True, text=True, check=True).stdout)
    [row] = [r for r in status["repositories"] if r["repository"] == fqrn]
    assert row["last_error"] and row["queue_depth"] == 0
    # The fixture's teardown checks the log and every kept file for the stack's secrets.


def test_a_provisioning_that_fails_half_way_is_completed_by_its_retry_and_only_then_consumed(stack, s3, daemons,
                                                                                             unique_name):
    """Issue 9: the request arrives before its bucket exists. Keys, repository, queue and topic are made, the
    notification step fails: the run fails naming the step and what is missing, the daemon does not consume the
    half-made repository's queue, and a retry once the bucket exists completes the provisioning (every step is
    idempotent); only then are the bucket's uploads published."""
    daemon = daemons(sync__max_attempts=30, sync__retry_initial_delay=1, sync__retry_max_delay=2).start()
    fqrn = unique_name + ".infn.it"
    seed_keys(stack, fqrn, "sub-" + unique_name)
    publish(stack, daemon_queue(daemon), "%s,sub-%s,%s,P" % (unique_name, unique_name, fqrn))
    [failed] = daemon.wait_for(lambda e: e.get("event") == "run_failed" and e.get("mode") == "provision"
                               and e.get("repository") == fqrn, "the provisioning without a bucket did not fail")
    assert "Notify the topic of changes under the bucket's prefix" in failed["error"], failed["error"]
    assert "bucket '%s' does not exist" % unique_name in failed["error"], failed["error"]
    assert (Path(stack["CVMFS_STANDIN_ROOT"]) / "etc/cvmfs/repositories.d" / fqrn).is_dir(), "half-made"
    assert not [e for e in daemon.events() if e.get("event") == "consuming" and e.get("queue") == unique_name]
    s3.create_bucket(Bucket=unique_name)
    daemon.wait_for(lambda e: e.get("event") == "run_succeeded" and e.get("mode") == "provision"
                    and e.get("repository") == fqrn, "the retry never completed the provisioning")
    daemon.wait_for(lambda e: e.get("event") == "consuming" and e.get("queue") == unique_name,
                    "the provisioned repository's queue was never consumed")
    s3.put_object(Bucket=unique_name, Key="cvmfs/after.txt", Body=b"after\n")
    assert "after.txt" in wait_published(stack, s3, fqrn, unique_name)
    assert not drain_queue(stack, daemons.queues["dlq"])


# -- the AMQP layer alone (fast: no playbooks) -----------------------------------------------------------

def _broker(stack, dead_letter_queue):
    from cvmfs_publisher_consumer import amqp
    settings = dict(daemon_amqp_settings(stack), client_cert="", client_key="", server_hostname="", heartbeat=30,
                    connection_timeout=10)
    broker = amqp.Broker(amqp.connection_parameters(settings, Path(stack["AMQP_PASSWORD_FILE"]).read_text().strip()),
                         dead_letter_queue)
    broker.connect()
    return broker


def test_retry_copies_and_dead_letters_carry_their_headers(stack, unique_name):
    from cvmfs_publisher_consumer import amqp
    broker = _broker(stack, unique_name + ".dlq")
    try:
        broker.ensure_queue(unique_name)
        publish(stack, unique_name, b"payload", headers={"x-origin": "test"})
        received = []
        assert broker.consume(unique_name, 10, received.append)
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            broker.process(0.1)
        assert broker.retry_later(received[0], attempts=2, not_before=1795705416.552)
        while len(received) < 2 and time.monotonic() < deadline:
            broker.process(0.1)
        copy = received[1]
        assert copy.body == b"payload" and copy.properties.headers["x-origin"] == "test"
        assert amqp.attempts_of(copy.properties) == 2 and amqp.not_before_of(copy.properties) == 1795705416.552
        assert broker.dead_letter(copy, "changes run failed 3 times; last error: boom", 3, amqp.TRANSIENT)
        broker.process(0.2)
        [(body, headers)] = drain_queue(stack, unique_name + ".dlq")
        assert body == b"payload" and headers["x-cvmfs-publisher-reason"].endswith("last error: boom")
        assert (headers["x-cvmfs-publisher-attempts"], headers["x-cvmfs-publisher-queue"]) == (3, unique_name)
        assert headers["x-cvmfs-publisher-cause"] == "transient"
        for body, origin, cause in ((b"ours", unique_name, amqp.TRANSIENT), (b"other", "elsewhere", amqp.TRANSIENT),
                                    (b"bad", unique_name, amqp.MALFORMED)):
            publish(stack, unique_name + ".dlq", body, headers={amqp.ORIGIN_HEADER: origin, amqp.CAUSE_HEADER: cause})
        assert broker.sweep_dead_letters() == {unique_name: 1, "elsewhere": 1}
        assert broker.sweep_dead_letters(remove_from={unique_name}) == {unique_name: 1, "elsewhere": 1}
        left = drain_queue(stack, unique_name + ".dlq")
        assert sorted(body for body, _headers in left) == [b"bad", b"other"]  # only the superseded one went
        assert broker.queue_exists(unique_name) == 0
    finally:
        broker.close()
        connection = amqp_connection(stack)
        connection.channel().queue_delete(unique_name)
        connection.channel().queue_delete(unique_name + ".dlq")
        connection.close()


def test_single_active_consumer_check(stack, unique_name):
    broker = _broker(stack, unique_name + ".dlq")
    connection = amqp_connection(stack)
    try:
        channel = connection.channel()
        channel.queue_declare(unique_name + "-plain", durable=True, arguments={"x-queue-type": "quorum"})
        channel.queue_declare(unique_name + "-sac", durable=True,
                              arguments={"x-queue-type": "quorum", "x-single-active-consumer": True})
        assert "x-single-active-consumer" in broker.single_active_consumer_problem(unique_name + "-plain")
        assert broker.single_active_consumer_problem(unique_name + "-sac") is None
        assert broker.queue_exists(unique_name + "-missing") is None
        for suffix in ("-plain", "-sac"):
            channel.queue_delete(unique_name + suffix)
        channel.queue_delete(unique_name + ".dlq")
    finally:
        connection.close()
        broker.close()


def test_a_hostile_tarball_is_refused_alone_and_the_run_succeeds(stack, s3, daemons, unique_name):
    """The issue's case through the daemon: a tarball whose link chain leaves its folder, uploaded with good
    objects. The good ones are published by a successful run; the refusal is logged, counted, in the status
    file and `cvmfs-publisher status`, and in the uploader's report; nothing is retried or dead-lettered."""
    daemon = daemons().start()
    fqrn = provision(stack, s3, daemon, unique_name)
    chain = io.BytesIO()
    with tarfile.open(fileobj=chain, mode="w:gz") as tar:
        for name, target in (("b", "."), ("c", "b/" * 8 + "../" * 7 + "etc/passwd")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    upload_many(s3, unique_name, {"cvmfs/evil.tgz": chain.getvalue(), "cvmfs/good.txt": b"good\n",
                                  "cvmfs/ok.tgz": tarball({"bin/run": b"run\n"})})
    refused = daemon.wait_for(lambda e: e.get("event") == "object_refused" and e.get("repository") == fqrn,
                              "the hostile tarball was never reported as refused")
    assert refused[0]["key"] == "cvmfs/evil.tgz" and refused[0]["category"] == "tarball"
    assert "member 'c' is a symbolic link" in refused[0]["reason"] and "resolves outside" in refused[0]["reason"]
    deadline = time.monotonic() + CONVERGE_TIMEOUT
    expected = {"good.txt": hashlib.sha256(b"good\n").hexdigest(), "ok/bin/run": hashlib.sha256(b"run\n").hexdigest()}
    while published_files(stack, fqrn) != expected and time.monotonic() < deadline:
        time.sleep(1)
    assert published_files(stack, fqrn) == expected
    assert not daemon.runs(fqrn, event="run_failed") and not drain_queue(stack, daemons.queues["dlq"])
    status = json.loads((daemon.folder / "state" / "status.json").read_text())
    assert [r["key"] for r in status["repositories"][fqrn]["refusals"]] == ["cvmfs/evil.tgz"]
    report = json.loads(s3.get_object(Bucket=unique_name, Key=".cvmfs-publisher/report.json")["Body"].read())
    assert [r["key"] for r in report["refused"]] == ["cvmfs/evil.tgz"]
    shown = subprocess.run([str(CLI), "-c", str(daemon.config_path), "status"], capture_output=True, text=True)
    assert "cvmfs/evil.tgz: tarball refused, nothing of it published: member 'c'" in shown.stdout, shown.stdout



def test_a_topic_changed_behind_the_publishers_back_is_repaired_by_the_periodic_reapply(stack, s3, sns, daemons,
                                                                                        unique_name):
    """provisioning.reapply_interval: every request applied here runs again. Someone's keys re-point the
    repository's topic (RGW 16.2 lets any user of the tenant do it, test_tenants.py): uploads then publish nothing;
    the next re-apply puts the topic and the bucket's notification back (logged and counted as drift) and uploads
    are published again, with no person in the loop."""
    daemon = daemons(provisioning__reapply_interval=5).start()
    fqrn = provision(stack, s3, daemon, unique_name)
    [arn] = {t["TopicArn"] for t in sns.list_topics()["Topics"] if t["TopicArn"].rsplit(":", 1)[-1] == unique_name}
    endpoint = json.loads(sns.get_topic_attributes(TopicArn=arn)["Attributes"]["EndPoint"])["EndpointAddress"]
    daemon.wait_for(lambda e: e.get("event") == "run_succeeded" and e.get("mode") == "provision", "no re-apply",
                    count=2)
    assert not [e for e in daemon.events() if e.get("event") == "provisioning_drift"], "an untouched repository drifted"

    sns.create_topic(Name=unique_name, Attributes={"push-endpoint": "amqp://127.0.0.1:1",
                                                   "amqp-exchange": "elsewhere", "amqp-ack-level": "none"})
    [drift] = daemon.wait_for(lambda e: e.get("event") == "provisioning_drift" and e.get("repository") == fqrn,
                              "the re-pointed topic was never repaired")
    assert drift["changed"] >= 2, drift   # the topic, and the notification made again to pick it up
    assert json.loads(sns.get_topic_attributes(TopicArn=arn)["Attributes"]["EndPoint"])["EndpointAddress"] == endpoint
    s3.put_object(Bucket=unique_name, Key="cvmfs/after-the-repair.txt", Body=b"back\n")
    assert "after-the-repair.txt" in wait_published(stack, s3, fqrn, unique_name)
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % daemon.metrics_port, timeout=10) as response:
        metrics = response.read().decode()
    assert 'cvmfs_publisher_provisioning_drift_total{repository="%s"} 1.0' % fqrn in metrics
