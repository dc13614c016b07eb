"""The daemon's decisions with a fake broker and a fake runner: what gets acked, retried, dead-lettered, run."""
import inspect
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from unittest import mock

import pika
import pika.exceptions
import pytest

from cvmfs_publisher_consumer import amqp, spread
from cvmfs_publisher_consumer.config import load
from cvmfs_publisher_consumer.daemon import Daemon
from cvmfs_publisher_consumer.repositories import discover_repositories
from cvmfs_publisher_consumer.runner import RunResult
from cvmfs_publisher_consumer.status import StatusFile


class FakeBroker:
    def __init__(self, queues):
        self.queues = set(queues)
        self.callbacks = {}
        self.settled = []           # (action, queue, body, extra)
        self.generation = 1
        self.is_open = False
        self._tag = 0
        self.dead_letters = []      # (origin queue, cause) in the dead-letter queue
        self.streams = {}           # stream name -> bodies appended (the registry)
        self.released = []

    def ensure_stream(self, queue):
        self.streams.setdefault(queue, [])
        self.queues.add(queue)

    def connect(self, declare_dead_letter=True):
        self.is_open = True

    def ensure_queue(self, queue):
        self.queues.add(queue)

    def consume(self, queue, prefetch, on_message, arguments=None):
        if queue == "forbidden":
            raise pika.exceptions.ChannelClosedByBroker(403, "ACCESS_REFUSED")
        if queue not in self.queues:
            return False
        self.callbacks[queue] = on_message
        for offset, body in enumerate(self.streams.get(queue, [])):   # a stream is read from its first entry
            self.deliver(queue, body, {"x-stream-offset": offset})
        return True

    def release(self, queue):
        self.released.append(queue)
        self.callbacks.pop(queue, None)

    def forward(self, delivery, queue):
        self.settled.append(("forward", delivery.queue, delivery.body, queue))
        self.streams[queue].append(delivery.body)
        if queue in self.callbacks:
            self.deliver(queue, delivery.body, {"x-stream-offset": len(self.streams[queue]) - 1})
        return True

    def consuming(self, queue):
        return queue in self.callbacks

    def single_active_consumer_problem(self, queue):
        return None

    def queue_exists(self, queue):
        return {"alice": 3}.get(queue, 0) if queue in self.queues else None

    def deliver(self, queue, body, headers=None):
        self._tag += 1
        delivery = amqp.Delivery(queue, self._tag, body, pika.BasicProperties(headers=headers), None, 1)
        self.callbacks[queue](delivery)
        return delivery

    def ack(self, delivery):
        self.settled.append(("ack", delivery.queue, delivery.body, None))
        return True

    def requeue(self, delivery):
        self.settled.append(("requeue", delivery.queue, delivery.body, None))
        return True

    def retry_later(self, delivery, attempts, not_before):
        self.settled.append(("retry", delivery.queue, delivery.body, (attempts, not_before)))
        return True

    def dead_letter(self, delivery, reason, attempts, cause):
        self.settled.append(("dead-letter", delivery.queue, delivery.body, (reason, attempts)))
        self.dead_letters.append((delivery.queue, cause))
        return True

    def sweep_dead_letters(self, remove_from=()):
        found = {}
        for queue, cause in self.dead_letters:
            if cause == amqp.TRANSIENT:
                found[queue] = found.get(queue, 0) + 1
        self.dead_letters = [(q, c) for q, c in self.dead_letters if not (c == amqp.TRANSIENT and q in remove_from)]
        return found

    def wake(self, callback):
        pass

    def process(self, time_limit):
        pass

    def stop_consuming(self):
        self.callbacks = {}

    def close(self):
        self.is_open = False

    def actions(self, registry=False):
        """What was settled, without the acks of registry entries (which only let the stream go on) unless asked."""
        return [(action, queue) for action, queue, _body, _extra in self.settled
                if registry or queue != REGISTRY]


def autospecced(fake):
    """``fake`` with each call the daemon makes checked against amqp.Broker's own signature first
    (mock.create_autospec), so the fake cannot drift from the real broker; every public Broker method and
    property must exist on the fake."""
    spec = mock.create_autospec(amqp.Broker, instance=True)
    for name in dir(amqp.Broker):
        if name.startswith("_"):
            continue
        assert hasattr(fake, name), "FakeBroker lacks Broker.%s" % name
        if isinstance(inspect.getattr_static(amqp.Broker, name), property):
            continue
        checked, implementation = getattr(spec, name), getattr(fake, name)

        def call(*args, _checked=checked, _implementation=implementation, **kwargs):
            _checked(*args, **kwargs)  # TypeError when the daemon calls it in a way Broker does not accept
            return _implementation(*args, **kwargs)
        setattr(fake, name, call)
    return fake


class FakeRunner:
    """Records runs; each run waits until the test releases it, then returns the scripted outcome."""

    def __init__(self):
        self.runs = []
        self.outcomes = []
        self.gate = threading.Semaphore(0)
        self.auto = True

    def run(self, playbook_key, extravars, label, cancel=lambda: False):
        self.runs.append((playbook_key, extravars))
        if not self.auto:
            self.gate.acquire(timeout=10)
        outcome = self.outcomes.pop(0) if self.outcomes else "successful"
        return RunResult(playbook=playbook_key, outcome=outcome, rc=0 if outcome == "successful" else 2,
                         duration=0.1, error="" if outcome == "successful" else "Publish: gateway said no",
                         refusals=self.refusals.pop(0) if getattr(self, "refusals", None) else None)


REGISTRY = "cvmfs-publisher.registry"


def event(key, bucket="alice", name="ObjectCreated:Put"):
    return json.dumps({"Records": [{"eventName": name, "s3": {"bucket": {"name": bucket},
                                                              "object": {"key": key, "size": 1}}}]}).encode()


@pytest.fixture
def daemon(project):
    repos = project["tmp"] / "repositories.d"
    (repos / "alice.infn.it").mkdir(parents=True)
    (repos / "bob.infn.it").mkdir()
    config = load(str(project["config_path"]), environ={})
    broker = autospecced(FakeBroker({"alice", "bob"}))
    runner = FakeRunner()
    clock = [1000.0]
    instance = Daemon(config, broker=broker, runner=runner, clock=lambda: clock[0])
    instance.clock_value = clock
    instance._connect()
    return instance


def started(daemon, count):
    """The runs are started by worker threads: wait until ``count`` have begun."""
    deadline = time.monotonic() + 10
    while len(daemon.runner.runs) < count:
        assert time.monotonic() < deadline, "expected %d runs, got %r" % (count, daemon.runner.runs)
        time.sleep(0.01)
    return daemon.runner.runs


def settle(daemon, runs=1):
    """Let ``runs`` fake runs finish and the I/O thread settle them (no wait once they are settled)."""
    goal = daemon.workers.in_flight - runs
    deadline = time.monotonic() + 10
    while daemon.workers.in_flight > goal:
        assert time.monotonic() < deadline, "%d run(s) not settled" % (daemon.workers.in_flight - goal)
        daemon._settle_finished(timeout=0.5)


def test_discovery_lists_valid_repositories(tmp_path):
    (tmp_path / "alice.infn.it").mkdir()
    (tmp_path / "not a repo").mkdir()
    (tmp_path / "file.infn.it").write_text("")
    (tmp_path / "bob.example.org").mkdir()
    assert discover_repositories(str(tmp_path), ["*.infn.it"]) == {"alice": "alice.infn.it"}
    assert len(discover_repositories(str(tmp_path))) == 2
    assert discover_repositories(str(tmp_path / "missing")) == {}


def test_consumes_the_provisioning_queue_the_registry_and_every_provisioned_repository(daemon):
    assert set(daemon.broker.callbacks) == {"publisher", REGISTRY, "alice", "bob"}


def test_malformed_provisioning_message_is_dead_lettered_with_reason(daemon):
    daemon.broker.deliver("publisher", b"alice,sub,alice.infn.it")
    [(action, queue, _body, (reason, attempts))] = daemon.broker.settled
    assert (action, queue, attempts) == ("dead-letter", "publisher", 0)
    assert "4 comma-separated fields" in reason
    daemon._start_ready()
    assert daemon.runner.runs == []


def test_provisioning_runs_the_playbook_then_consumes_the_new_queue(daemon):
    daemon.broker.queues.add("carol")
    daemon.broker.deliver("publisher", b"carol,sub-c,carol.infn.it,P")
    daemon._start_ready()
    settle(daemon)
    assert daemon.runner.runs == [("provision_playbook", {"cvmfs_repository": "carol.infn.it",
                                                          "cvmfs_subject": "sub-c"})]
    assert daemon.broker.actions() == [("forward", "publisher")]
    assert daemon.broker.streams[REGISTRY] == [b"carol,sub-c,carol.infn.it,P"]
    assert "carol" in daemon.broker.callbacks
    daemon.broker.deliver("carol", event("cvmfs/x", bucket="carol"))
    daemon._start_ready()
    settle(daemon)
    assert daemon.runner.runs[-1] == ("sync_playbook", {"cvmfs_repository": "carol.infn.it",
                                                        "cvmfs_sync_mode": "changes", "cvmfs_sync_keys": ["cvmfs/x"]})


def test_events_arriving_during_a_sync_make_one_next_run_acked_after_it(daemon):
    daemon.runner.auto = False
    daemon.broker.deliver("alice", event("cvmfs/a"))
    daemon._start_ready()
    for key in ("cvmfs/b", "cvmfs/c", "cvmfs/b", "cvmfs/a"):
        daemon.broker.deliver("alice", event(key, name="ObjectRemoved:Delete"))
    daemon._start_ready()
    started(daemon, 1)
    time.sleep(0.2)
    assert len(daemon.runner.runs) == 1            # one sync per repository at a time
    daemon.runner.gate.release()
    settle(daemon)
    assert daemon.broker.actions() == [("ack", "alice")]
    daemon._start_ready()
    assert started(daemon, 2)[1][1]["cvmfs_sync_keys"] == ["cvmfs/a", "cvmfs/b", "cvmfs/c"]
    assert daemon.broker.actions() == [("ack", "alice")]   # not before the run succeeds
    daemon.runner.gate.release()
    settle(daemon)
    assert daemon.broker.actions() == [("ack", "alice")] * 5
    status = StatusFile.read(daemon.config["state_dir"])
    assert status["repositories"]["alice.infn.it"]["last_publish"] == 1000.0


def test_two_repositories_run_in_parallel(daemon):
    daemon.runner.auto = False
    daemon.broker.deliver("alice", event("cvmfs/a"))
    daemon.broker.deliver("bob", event("cvmfs/b", bucket="bob"))
    daemon._start_ready()
    assert sorted(r[1]["cvmfs_repository"] for r in started(daemon, 2)) == ["alice.infn.it", "bob.infn.it"]
    daemon.runner.gate.release()
    daemon.runner.gate.release()
    settle(daemon, runs=2)


def test_failed_run_is_retried_with_attempts_then_dead_lettered(daemon):
    daemon.runner.outcomes = ["failed"]
    daemon.broker.deliver("alice", event("cvmfs/a"))
    daemon.broker.deliver("alice", event("cvmfs/b"), headers={amqp.ATTEMPTS_HEADER: 4})  # max_attempts is 5
    daemon._start_ready()
    settle(daemon)
    (retry, _q, _b, (attempts, not_before)), (dead, _q2, _b2, (reason, dead_attempts)) = daemon.broker.settled
    assert (retry, attempts) == ("retry", 1) and not_before > 1000.0
    assert (dead, dead_attempts) == ("dead-letter", 5)
    assert reason == "changes run failed 5 times; last error: Publish: gateway said no"
    status = StatusFile.read(daemon.config["state_dir"])
    assert status["repositories"]["alice.infn.it"]["last_error"] == "Publish: gateway said no"


def _logged(caplog, event):
    return [record.fields for record in caplog.records if (getattr(record, "fields", None) or {}).get("event") == event]


def test_dead_lettering_is_logged_and_brings_a_full_sync_that_supersedes_the_dead_letters(daemon, caplog):
    caplog.set_level(logging.INFO)
    daemon.runner.outcomes = ["failed"]
    daemon.broker.deliver("alice", event("cvmfs/a"), headers={amqp.ATTEMPTS_HEADER: 4})  # max_attempts is 5
    daemon.broker.deliver("alice", event("cvmfs/b"), headers={amqp.ATTEMPTS_HEADER: 4})
    daemon._start_ready()
    settle(daemon)
    [record] = _logged(caplog, "dead_letter")
    assert (record["repository"], record["count"], record["cause"]) == ("alice.infn.it", 2, "transient")
    assert record["reason"] == "changes run failed 5 times; last error: Publish: gateway said no"
    assert len(daemon.broker.dead_letters) == 2
    daemon._start_ready()
    assert len(daemon.runner.runs) == 1               # the lane backs off first
    daemon.clock_value[0] += 11                       # retry_initial_delay is 10 (with jitter: 5-10)
    daemon._start_ready()
    settle(daemon)
    assert daemon.runner.runs[-1] == ("sync_playbook", {"cvmfs_repository": "alice.infn.it", "cvmfs_sync_mode": "full"})
    assert daemon.broker.dead_letters == []           # superseded by the successful full sync
    [cleared] = _logged(caplog, "dead_letters_cleared")
    assert (cleared["repository"], cleared["count"]) == ("alice.infn.it", 2)


def test_dead_letters_left_by_an_earlier_daemon_bring_a_full_sync(daemon, caplog):
    daemon.broker.dead_letters = [("bob", amqp.TRANSIENT), ("bob", amqp.MALFORMED), ("gone", amqp.TRANSIENT)]
    daemon._connect()
    daemon._start_ready()
    settle(daemon)
    assert daemon.runner.runs == [("sync_playbook", {"cvmfs_repository": "bob.infn.it", "cvmfs_sync_mode": "full"})]
    assert daemon.broker.dead_letters == [("bob", amqp.MALFORMED), ("gone", amqp.TRANSIENT)]


def test_with_several_hosts_owed_full_syncs_run_only_where_this_host_is_active(daemon):
    """With a management API (several hosts), the full sync owed after dead letters runs only for the
    repositories this host is the active writer of; the others stay owed until it becomes active."""
    daemon.looker = mock.create_autospec(spread.Looker, instance=True)   # several hosts
    daemon.broker.dead_letters = [("alice", amqp.TRANSIENT), ("bob", amqp.TRANSIENT)]
    daemon._connect()
    daemon.placement = {"active": ["alice"], "standby": ["bob"], "hosts": {}}   # the last look said so
    daemon._start_ready()
    settle(daemon)
    assert daemon.runner.runs == [("sync_playbook", {"cvmfs_repository": "alice.infn.it", "cvmfs_sync_mode": "full"})]
    assert daemon.scheduler.owes_full("bob.infn.it") and not daemon._idle("bob")
    daemon.placement = {"active": ["alice", "bob"], "standby": [], "hosts": {}}
    daemon._start_ready()
    settle(daemon)
    assert daemon.runner.runs[-1] == ("sync_playbook", {"cvmfs_repository": "bob.infn.it", "cvmfs_sync_mode": "full"})


def test_after_a_failed_run_new_events_wait_for_the_backoff_other_repositories_do_not(daemon):
    daemon.runner.outcomes = ["failed"]
    daemon.broker.deliver("alice", event("cvmfs/a"))
    daemon._start_ready()
    settle(daemon)
    daemon.broker.deliver("alice", event("cvmfs/new"))   # a fresh event: no retry header
    daemon.broker.deliver("bob", event("cvmfs/b", bucket="bob"))
    daemon._start_ready()
    settle(daemon)
    assert [r[1]["cvmfs_repository"] for r in daemon.runner.runs] == ["alice.infn.it", "bob.infn.it"]
    daemon.clock_value[0] += 11
    daemon._start_ready()
    settle(daemon)
    assert daemon.runner.runs[-1][1]["cvmfs_sync_keys"] == ["cvmfs/new"]  # the retry copy comes back on its own


def test_a_retry_copy_waits_for_its_time(daemon):
    daemon.broker.deliver("alice", event("cvmfs/a"), headers={amqp.ATTEMPTS_HEADER: 1,
                                                              amqp.NOT_BEFORE_HEADER: 1030000})
    daemon._start_ready()
    assert daemon.runner.runs == []
    daemon.clock_value[0] = 1030.0
    daemon._start_ready()
    settle(daemon)
    assert daemon.broker.actions() == [("ack", "alice")]


def test_records_are_judged_one_by_one_only_unreadable_messages_are_dead_lettered(daemon, caplog):
    daemon.broker.deliver("alice", event("cvmfs/a", bucket="bob"))
    daemon.broker.deliver("alice", event("other/a"))
    daemon.broker.deliver("alice", event("cvmfs/a", bucket="mallory"))
    daemon.broker.deliver("alice", event("cvmfs/../../etc/passwd"))
    daemon.broker.deliver("alice", b"{not json")
    daemon.broker.deliver("alice", b"\x00\xff")
    daemon.broker.deliver("alice", b'{"Records": [{"eventName": "ObjectCreated:Put"}]}')
    daemon._start_ready()
    assert daemon.runner.runs == []
    assert daemon.broker.actions() == [("ack", "alice")] * 4 + [("dead-letter", "alice")] * 3
    reasons = [extra[0] for action, _q, _b, extra in daemon.broker.settled if action == "dead-letter"]
    assert "not valid JSON" in reasons[0]
    assert "not UTF-8" in reasons[1]
    assert reasons[2] == "Records[0]: s3.bucket.name missing"
    refused = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "object_refused"]
    assert [(r.fields["repository"], r.fields["key"], r.fields["category"]) for r in refused] == [
        ("alice.infn.it", "cvmfs/../../etc/passwd", "key")]
    assert "'..' path segment" in refused[0].fields["reason"]
    sample = daemon.metrics.registry.get_sample_value("cvmfs_publisher_objects_refused_total",
                                                      {"repository": "alice.infn.it", "reason": "key"})
    assert sample == 1.0


def test_a_bad_record_does_not_drop_the_good_one_beside_it(daemon):
    body = json.dumps({"Records": [json.loads(event("cvmfs/../x"))["Records"][0],
                                   json.loads(event("cvmfs/good"))["Records"][0]]}).encode()
    daemon.broker.deliver("alice", body)
    daemon._start_ready()
    settle(daemon)
    assert [run[1].get("cvmfs_sync_keys") for run in daemon.runner.runs] == [["cvmfs/good"]]
    assert daemon.broker.actions() == [("ack", "alice")]


def test_shutdown_requeues_waiting_messages_and_finishes_running_ones(daemon):
    daemon.runner.auto = False
    daemon.broker.deliver("alice", event("cvmfs/a"))
    daemon._start_ready()
    daemon.broker.deliver("alice", event("cvmfs/b"))
    daemon.runner.gate.release()
    daemon.request_stop()
    daemon._shutdown()
    assert sorted(daemon.broker.actions()) == [("ack", "alice"), ("requeue", "alice")]
    assert daemon.broker.callbacks == {}


def test_a_queue_that_cannot_be_consumed_is_reported_and_skipped(daemon, caplog):
    daemon.subscriptions.subscribe("forbidden.infn.it")
    daemon.subscriptions.subscribe("missing.infn.it")
    assert daemon.subscriptions.missing_queues == {"forbidden", "missing"}
    assert any("ACCESS_REFUSED" in record.getMessage() for record in caplog.records)
    assert set(daemon.broker.callbacks) == {"publisher", REGISTRY, "alice", "bob"}


def test_queue_depths_reach_the_metrics_the_status_file_and_the_page(daemon):
    from prometheus_client import generate_latest
    daemon.broker.deliver("alice", event("cvmfs/a"))
    daemon.runner.auto = False
    daemon._start_ready()
    started(daemon, 1)
    daemon.broker.deliver("alice", event("cvmfs/b"))   # waits behind the running batch
    daemon._probe_depths()
    text = generate_latest(daemon.metrics.registry).decode()
    assert 'cvmfs_publisher_repository_queue_messages{repository="alice.infn.it"} 3.0' in text
    assert 'cvmfs_publisher_repository_queue_messages{repository="bob.infn.it"} 0.0' in text
    assert 'cvmfs_publisher_repository_pending_messages{repository="alice.infn.it"} 2.0' in text
    status = StatusFile.read(daemon.config["state_dir"])
    assert status["queue_depths"]["alice"] == 3 and status["queues"]["publisher"] == daemon.config["queues.publisher"]
    assert status["host"]
    page = daemon.status_page().decode()
    assert "alice.infn.it" in page and "bob.infn.it" in page and "(this daemon)" in page
    daemon.runner.gate.release()
    settle(daemon)


def test_refusals_reported_by_the_sync_run_are_logged_counted_and_listed_in_the_status(daemon, caplog):
    caplog.set_level(logging.INFO)
    bad = {"key": "cvmfs/evil.tar.gz", "etag": "e1", "category": "tarball",
           "reason": "member 'c' is a symbolic link to 'b/b/../../x', which resolves outside the tarball's folder"}
    old = {"key": "cvmfs/old.tar", "etag": "e0", "category": "limit", "reason": "tarball expands more than 200 times"}
    daemon.runner.refusals = [{"current": [old, bad], "new": [bad], "cleared": ["cvmfs/fixed.tgz"], "count": 2}]
    daemon.broker.deliver("alice", event("cvmfs/evil.tar.gz"))
    daemon._start_ready()
    settle(daemon)
    assert daemon.broker.actions() == [("ack", "alice")]
    logged = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("event") == "object_refused"]
    assert logged == [{"event": "object_refused", "repository": "alice.infn.it", "key": "cvmfs/evil.tar.gz",
                       "reason": bad["reason"], "category": "tarball", "etag": "e1"}]
    cleared = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("event") == "refusal_cleared"]
    assert [c["key"] for c in cleared] == ["cvmfs/fixed.tgz"]
    registry = daemon.metrics.registry
    assert registry.get_sample_value("cvmfs_publisher_objects_refused_total",
                                     {"repository": "alice.infn.it", "reason": "tarball"}) == 1.0
    assert registry.get_sample_value("cvmfs_publisher_objects_refused_total",
                                     {"repository": "alice.infn.it", "reason": "limit"}) is None
    entry = StatusFile.read(daemon.config["state_dir"])["repositories"]["alice.infn.it"]
    assert entry["refusals"] == [old, bad] and entry["refusals_count"] == 2


# -- many hosts: the registry ----------------------------------------------------------------------------------

def test_the_registry_is_replayed_on_connect_and_only_what_is_missing_here_runs(daemon):
    carol = b'{"version": 1, "repository": "carol.infn.it", "kind": "personal", "subject": "sub-c"}'
    daemon.broker.queues.add("carol")
    daemon.broker.streams[REGISTRY] += [carol, b"dave,sub-d,dave.infn.it,P", b"x,y,z.example.org,P", carol]
    daemon.broker.callbacks.clear()
    daemon._connect()                               # what a host joining later (or reconnecting) does
    daemon._start_ready()
    settle(daemon, runs=2)
    ran = sorted(extravars["cvmfs_repository"] for _playbook, extravars in daemon.runner.runs)
    assert ran == ["carol.infn.it", "dave.infn.it"]  # once each; the invalid entry is skipped
    assert "carol" in daemon.broker.callbacks
    assert daemon.broker.actions(registry=True).count(("ack", REGISTRY)) == 4
    config_dir = Path(daemon.config["repositories.config_dir"])
    for fqrn in ("carol.infn.it", "dave.infn.it"):  # what the playbook would have created
        (config_dir / fqrn).mkdir()
    daemon.broker.callbacks.clear()
    daemon._connect()
    daemon._start_ready()
    assert len(daemon.runner.runs) == 2             # applied and present: nothing runs again
    shutil.rmtree(config_dir / "dave.infn.it")
    daemon.broker.callbacks.clear()
    daemon._connect()
    daemon._start_ready()
    settle(daemon)
    assert daemon.runner.runs[-1][1]["cvmfs_repository"] == "dave.infn.it"   # lost here: provisioned again
    assert json.loads((Path(daemon.config["state_dir"]) / "registry.json").read_text())["applied"].keys() == {
        "carol.infn.it", "dave.infn.it"}


def test_a_failed_provisioning_is_retried_here_and_never_dead_lettered(daemon):
    daemon.runner.outcomes = ["failed", "failed"]
    daemon.broker.deliver("publisher", b"carol,sub-c,carol.infn.it,P")
    for _ in range(3):
        daemon._start_ready()
        settle(daemon)
        daemon.clock_value[0] += 3600               # past any backoff
    assert [playbook for playbook, _extravars in daemon.runner.runs].count("provision_playbook") == 3
    assert daemon.broker.actions() == [("forward", "publisher")]
    assert "carol.infn.it" in daemon.registry.applied


def test_positions_above_the_fair_share_are_given_up_and_who_is_active_is_reported(daemon):
    from prometheus_client import generate_latest

    from cvmfs_publisher_consumer.spread import Looker, View
    me = daemon.host_id
    daemon.broker.queues |= {"carol", "dave"}
    for short in ("carol", "dave"):
        daemon.subscriptions.subscribe(short + ".infn.it")
    queues = ["alice", "bob", "carol", "dave"]
    view = View(active={q: me for q in queues}, standby={q: {"other"} for q in queues})

    class Management:
        def view(self):
            return view
    daemon.looker = Looker(Management(), interval=60)
    daemon.runner.auto = False
    daemon.broker.deliver("alice", event("cvmfs/a"))       # alice is busy: its position is not given up
    daemon._start_ready()
    started(daemon, 1)
    deadline = time.monotonic() + 10
    while not daemon.broker.released:                      # asks for the view (in the background), then acts on it
        assert time.monotonic() < deadline, "the view was never acted on"
        daemon._spread()
        time.sleep(0.01)
    assert daemon.broker.released == ["bob", "carol"]     # 4 of 4 with 2 hosts: 2 go, idle ones only
    assert {"bob", "carol"} <= set(daemon.broker.callbacks)  # subscribed again, as a standby
    status = StatusFile.read(daemon.config["state_dir"])
    assert status["host"] == me and status["active"] == ["alice.infn.it", "dave.infn.it"]
    assert status["standby"] == ["bob.infn.it", "carol.infn.it"] and status["hosts"] == {me: 2, "other": 0}
    assert status["repositories"]["alice.infn.it"]["active_host"] == me
    text = generate_latest(daemon.metrics.registry).decode()
    assert 'cvmfs_publisher_repository_active{repository="bob.infn.it"} 0.0' in text
    assert 'cvmfs_publisher_repository_active{repository="dave.infn.it"} 1.0' in text
    assert "cvmfs_publisher_positions_given_up_total 2.0" in text
    daemon.runner.gate.release()
    settle(daemon)


def test_a_half_made_repository_is_not_consumed_until_its_provisioning_succeeds(daemon, project):
    """Provisioning failed after the repository was created (say, the bucket did not exist yet): it shows in
    repositories.d, but its queue waits until the retry of the provisioning succeeds."""
    daemon.broker.queues.add("carol")
    daemon.runner.outcomes = ["failed"]
    daemon.broker.deliver("publisher", b"carol,sub-c,carol.infn.it,P")
    daemon._start_ready()
    settle(daemon)
    (project["tmp"] / "repositories.d" / "carol.infn.it").mkdir()
    daemon.subscriptions.rescan_now()
    daemon._rescan()
    assert "carol" not in daemon.broker.callbacks
    assert StatusFile.read(daemon.config["state_dir"])["repositories"]["carol.infn.it"]["provisioning"] == "failed"
    daemon.clock_value[0] += 3600  # past the backoff: the retry runs, and succeeds
    daemon._start_ready()
    settle(daemon)
    assert [p for p, _extravars in daemon.runner.runs].count("provision_playbook") == 2
    assert "carol" in daemon.broker.callbacks
    assert "provisioning" not in StatusFile.read(daemon.config["state_dir"])["repositories"]["carol.infn.it"]


def test_the_fake_broker_is_held_to_the_real_brokers_signatures(daemon):
    with pytest.raises(TypeError):
        daemon.broker.ack(None, "an argument amqp.Broker.ack does not take")
    with pytest.raises(TypeError):
        daemon.broker.retry_later(None, 1)  # not_before missing
    with pytest.raises(AssertionError, match="FakeBroker lacks Broker.ack"):
        autospecced(type("Incomplete", (), {})())
