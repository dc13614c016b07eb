"""The daemon's decisions with a fake broker and a fake runner: what gets acked, retried, dead-lettered, run."""
import json
import logging
import time
from unittest import mock

import pytest

from cvmfs_publisher_consumer import amqp, spread
from cvmfs_publisher_consumer.status import StatusFile
from fakes import autospecced, event, logged, settle, started


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


def test_dead_lettering_is_logged_and_brings_a_full_sync_that_supersedes_the_dead_letters(daemon, caplog):
    caplog.set_level(logging.INFO)
    daemon.runner.outcomes = ["failed"]
    daemon.broker.deliver("alice", event("cvmfs/a"), headers={amqp.ATTEMPTS_HEADER: 4})  # max_attempts is 5
    daemon.broker.deliver("alice", event("cvmfs/b"), headers={amqp.ATTEMPTS_HEADER: 4})
    daemon._start_ready()
    settle(daemon)
    [record] = logged(caplog, "dead_letter")
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
    [cleared] = logged(caplog, "dead_letters_cleared")
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


def test_the_fake_broker_is_held_to_the_real_brokers_signatures(daemon):
    with pytest.raises(TypeError):
        daemon.broker.ack(None, "an argument amqp.Broker.ack does not take")
    with pytest.raises(TypeError):
        daemon.broker.retry_later(None, 1)  # not_before missing
    with pytest.raises(AssertionError, match="FakeBroker lacks Broker.ack"):
        autospecced(type("Incomplete", (), {})())


def test_run_started_says_how_long_its_oldest_message_waited_in_the_daemon(daemon, caplog):
    caplog.set_level(logging.INFO)
    daemon.runner.auto = False
    daemon.broker.deliver("alice", event("cvmfs/a"))
    daemon.clock_value[0] += 0.25
    daemon.broker.deliver("alice", event("cvmfs/b"))
    daemon.clock_value[0] += 0.5
    daemon._start_ready()
    started(daemon, 1)
    [record] = logged(caplog, "run_started")
    assert record["waited"] == 0.75, "received at 1000.0, started at 1000.75"
    daemon.runner.gate.release()
    settle(daemon)
