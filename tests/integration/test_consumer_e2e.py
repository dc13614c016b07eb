"""End to end: the cvmfs-publisher daemon on the local stack (real RGW notifications, real RabbitMQ, real
ansible-runner runs of the collection's playbooks, the cvmfs_server stand-in). The harness is
tests/daemon_harness.py.
"""
import hashlib
import io
import json
import os
import subprocess
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest

from daemon_harness import (
    CLI,
    CONVERGE_TIMEOUT,
    _broker,
    _processes_mentioning,
    _run_intervals,
    amqp_connection,
    assert_transaction_closes,
    daemon_queue,
    drain_queue,
    holding_publish,
    provision,
    publish,
    published_files,
    rabbitmqctl,
    seed_keys,
    standin,
    sync_event,
    tarball,
    upload_many,
    wait_published,
)
from helpers import stack_vars_file

import daemon_harness

pytestmark = pytest.mark.slow

daemons = daemon_harness.daemons   # the fixture: daemons with this test's own queues, checked for secrets


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
    """1,000 events waiting in the repository's queue are coalesced into a few runs. They are all queued before the
    daemon consumes them: while uploads go on, the number of runs is the upload's duration over a run's, which
    depends on the machine's load (bench/consumer.py measures a live burst), not on the coalescing."""
    daemon = daemons().start()
    fqrn = provision(stack, s3, daemon, unique_name)
    daemon.stop()
    upload_many(s3, unique_name, {"cvmfs/burst/%03d/f%04d" % (i % 37, i): b"%d\n" % i for i in range(1000)})
    connection = amqp_connection(stack)
    try:
        queued = connection.channel().queue_declare(queue=unique_name, passive=True).method.message_count
    finally:
        connection.close()
    assert queued == 1000, "the synchronous topic queued %d events for 1,000 uploads" % queued
    daemon.start()
    wait_published(stack, s3, fqrn, unique_name)
    runs = daemon.runs(fqrn)
    assert 1 <= len(runs) <= 10, [r.get("keys") for r in runs]
    daemon.wait_for(sync_event("run_succeeded", fqrn), "runs did not finish", count=len(runs))
    assert sum(r["keys"] for r in runs) >= 1000


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
