"""The daemon harness of the end-to-end tests (tests/integration/test_consumer_e2e.py) and of the tests and
benchmarks that run the real daemon: the stack's broker and buckets, the published tree, ``DaemonProcess`` (one
``cvmfs-publisher run`` with its own state dir and log) and its ``daemons`` fixture (``daemons = harness.daemons``
in a test file).

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pika
import pytest
import yaml

import helpers
from helpers import amqp_parameters, daemon_amqp_settings, stack_vars_file

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "devstack"))
import standin  # noqa: E402  (the stand-in's read API for tests)
import stacklib  # noqa: E402

CLI = REPO_ROOT / ".venv" / "bin" / "cvmfs-publisher"
PREFIX = "cvmfs/"
CONVERGE_TIMEOUT = 600
TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar")


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
    helpers.seed_keys(stack, fqrn, "--subject", subject)


def stack_secrets(stack):
    folder = Path(stack["DEVSTACK_DIR"]) / "secrets"
    return [p.read_text().strip() for p in folder.iterdir() if p.is_file() and len(p.read_text().strip()) >= 6]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the bucket and the published tree --------------------------------------------------------------------

def upload_many(s3, bucket, objects, workers=16, patience=120):
    """PUT every object, ``workers`` at once. Each PUT rides out an RGW restart: radosgw 16.2 crashes now and then
    under the scale-out load and devstack/keepalive.py starts it again. botocore's own retries cannot: one client's
    retries share a quota (500 tokens, 5 per retry), which dozens of threads meeting "connection refused" at once
    use up in a second, and then every call fails at once. So a PUT that cannot connect is tried again here, each
    second, for up to ``patience`` seconds."""
    from botocore.exceptions import ConnectionError as CannotConnect

    def put(item):
        deadline = time.monotonic() + patience
        while True:
            try:
                return s3.put_object(Bucket=bucket, Key=item[0], Body=item[1])
            except CannotConnect:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(put, objects.items()))


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


# -- used by several tests ------------------------------------------------------------------------------

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


def _broker(stack, dead_letter_queue):
    from cvmfs_publisher_consumer import amqp
    settings = dict(daemon_amqp_settings(stack), client_cert="", client_key="", server_hostname="", heartbeat=30,
                    connection_timeout=10)
    broker = amqp.Broker(amqp.connection_parameters(settings, Path(stack["AMQP_PASSWORD_FILE"]).read_text().strip()),
                         dead_letter_queue)
    broker.connect()
    return broker
