"""``cvmfs-publisher dlq list|show|replay|purge`` on the real broker of the local stack.

Messages reach the dead-letter queue the way the daemon puts them there: consumed from their queue with the
daemon's own Broker and dead-lettered with ``Broker.dead_letter`` (headers: reason, origin, attempts, when).
Each test has its own queues, so the tests never see each other's messages.
"""
import io
import json
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pika
import pytest
import yaml

from cvmfs_publisher_consumer import amqp, dlq
from cvmfs_publisher_consumer.config import load

REPO_ROOT = Path(__file__).resolve().parents[2]
CLI = REPO_ROOT / ".venv" / "bin" / "cvmfs-publisher"


@pytest.fixture
def setup(stack, tmp_path, unique_name):
    """A configuration naming this test's queues, and the queues themselves (the two repositories' and the DLQ)."""
    queues = {"publisher": "publisher-" + unique_name, "dlq": unique_name + ".dlq",
              "alice": unique_name + "a", "bob": unique_name + "b"}
    config = {"amqp": {"host": stack["AMQP_HOST"], "port": int(stack["AMQP_PORT"]), "user": stack["AMQP_USER"],
                       "password_file": stack["AMQP_PASSWORD_FILE"], "vhost": stack["AMQP_VHOST"], "tls": False},
              "queues": {"publisher": queues["publisher"], "dead_letter": queues["dlq"]},
              "ansible": {"project_dir": str(REPO_ROOT)}, "state_dir": str(tmp_path / "state")}
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    loaded = load(str(path), environ={})
    broker = amqp.Broker(amqp.connection_parameters(loaded.section("amqp"),
                                                    Path(stack["AMQP_PASSWORD_FILE"]).read_text().strip()),
                         queues["dlq"])
    broker.connect()
    for name in ("publisher", "alice", "bob"):
        broker.ensure_queue(queues[name])
    yield SimpleNamespace(config=loaded, path=path, queues=queues, broker=broker)
    for name in queues.values():
        channel = broker._connection.channel()
        channel.queue_delete(name)
    broker.close()


def dead_letter(setup, queue, body, reason, attempts=5, at=None, headers=None, cause=amqp.TRANSIENT):
    """Publish ``body`` to ``queue``, consume it with the daemon's Broker and dead-letter it as the daemon does."""
    channel = setup.broker._connection.channel()
    channel.confirm_delivery()
    channel.basic_publish("", queue, body.encode(), pika.BasicProperties(delivery_mode=2, headers=headers),
                          mandatory=True)
    got = []
    setup.broker.consume(queue, 10, got.append)
    deadline = time.monotonic() + 30
    while not got:
        assert time.monotonic() < deadline, "the message never arrived on %s" % queue
        setup.broker.process(0.1)
    assert setup.broker.dead_letter(got[0], reason, attempts, cause)
    setup.broker.stop_consuming()
    setup.broker.process(0.1)
    if at is not None:   # age it: re-stamp the dead-lettered copy (only the time header differs)
        rewrite_dead_letter_time(setup, at)


def rewrite_dead_letter_time(setup, at):
    """Rotate the whole DLQ once, giving the newest message (the last one) the dead-lettered-at time ``at``."""
    channel = setup.broker._connection.channel()
    channel.confirm_delivery()
    held = []
    while True:
        method, properties, body = channel.basic_get(setup.queues["dlq"], auto_ack=False)
        if method is None:
            break
        held.append((method, properties, body))
    for index, (method, properties, body) in enumerate(held):
        headers = dict(properties.headers)
        if index == len(held) - 1:
            headers[amqp.DEAD_LETTERED_AT_HEADER] = int(at)
        channel.basic_publish("", setup.queues["dlq"], body, pika.BasicProperties(delivery_mode=2, headers=headers),
                              mandatory=True)
        channel.basic_ack(method.delivery_tag)
    channel.close()


def cli(setup, *args, stdin=None):
    return subprocess.run([str(CLI), "-c", str(setup.path), "dlq", *args], capture_output=True, text=True,
                          timeout=120, stdin=stdin if stdin is not None else subprocess.DEVNULL)


def depth(setup, name, expected):
    """The queue's ready count once it equals ``expected`` (returned messages reach a quorum queue through its
    log, so the count may lag a moment); whatever it is after 30 s otherwise."""
    deadline = time.monotonic() + 30
    while True:
        count = setup.broker.queue_exists(setup.queues[name])
        if count == expected or time.monotonic() > deadline:
            return count
        time.sleep(0.2)


def event(key):
    return json.dumps({"Records": [{"eventName": "ObjectCreated:Put",
                                    "s3": {"bucket": {"name": "x"}, "object": {"key": key, "size": 1}}}]})


def fill(setup):
    q = setup.queues
    dead_letter(setup, q["alice"], event("cvmfs/a1"), "changes run failed 5 times; last error: Vault unreachable")
    dead_letter(setup, q["alice"], event("cvmfs/a2"), "object key 'cvmfs/../x': '..' path segment", attempts=0,
                cause=amqp.MALFORMED)
    dead_letter(setup, q["bob"], event("cvmfs/b1"), "changes run failed 5 times; last error: disk full",
                at=time.time() - 3 * 86400)
    dead_letter(setup, q["publisher"], "%sc,sub,%sc.infn.it,P" % (q["alice"], q["alice"]),
                "provision run failed 5 times; last error: RGW down")
    assert depth(setup, "dlq", 4) == 4


def test_list_and_show_filter_by_repository_reason_and_age_and_leave_the_queue_as_it_was(setup):
    fill(setup)
    q = setup.queues
    listed = cli(setup, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    everything = json.loads(listed.stdout)
    assert [m["origin"] for m in everything] == [q["alice"], q["alice"], q["bob"], q["publisher"]]
    assert everything[3]["repository"] == q["alice"] + "c.infn.it"

    by_repo = json.loads(cli(setup, "list", "--json", "--repository", q["alice"] + ".infn.it").stdout)
    assert [m["body"] for m in by_repo] == [event("cvmfs/a1"), event("cvmfs/a2")]
    by_reason = json.loads(cli(setup, "list", "--json", "--reason", "RUN FAILED").stdout)
    assert [m["origin"] for m in by_reason] == [q["alice"], q["bob"], q["publisher"]]
    old = json.loads(cli(setup, "list", "--json", "--older-than", "2d").stdout)
    assert [m["body"] for m in old] == [event("cvmfs/b1")]
    recent = json.loads(cli(setup, "list", "--json", "--newer-than", "1h", "--reason", "failed").stdout)
    assert [m["origin"] for m in recent] == [q["alice"], q["publisher"]]

    table = cli(setup, "list", "--repository", q["bob"])
    assert table.returncode == 0 and "last error: disk full" in table.stdout
    assert "1 message(s) in %s match" % q["dlq"] in table.stdout
    shown = cli(setup, "show", "--reason", "path segment")
    assert "reason:     object key 'cvmfs/../x': '..' path segment" in shown.stdout
    assert '"cvmfs/a2"' in shown.stdout and "1 message(s)" in shown.stdout
    bad = cli(setup, "list", "--older-than", "two days")
    assert bad.returncode == 2 and "invalid age 'two days'" in bad.stderr
    assert depth(setup, "dlq", 4) == 4, "reading the dead-letter queue must not take anything out of it"


def test_replay_returns_messages_with_attempts_reset_and_history_kept(setup):
    fill(setup)
    q = setup.queues
    result = cli(setup, "replay", "--repository", q["alice"], "--reason", "run failed")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "replayed 1 message(s) to their queues; 0 could not be replayed; 3 left in %s" % q["dlq"] in result.stdout
    channel = setup.broker._connection.channel()
    method, properties, body = channel.basic_get(q["alice"], auto_ack=True)
    assert body.decode() == event("cvmfs/a1")
    headers = properties.headers
    assert amqp.ATTEMPTS_HEADER not in headers and amqp.REASON_HEADER not in headers
    assert amqp.attempts_of(properties) == 0
    [entry] = headers[dlq.HISTORY_HEADER]
    assert entry["reason"] == "changes run failed 5 times; last error: Vault unreachable"
    assert entry["cause"] == amqp.TRANSIENT and amqp.CAUSE_HEADER not in headers
    assert entry["attempts"] == 5 and entry["queue"] == q["alice"] and entry["replayed_at"] >= entry["dead_lettered_at"]

    # Dead-lettered again and replayed again: the history grows, oldest first.
    dead_letter(setup, q["alice"], body.decode(), "changes run failed 5 times; last error: again", headers=headers)
    assert cli(setup, "replay", "--reason", "again").returncode == 0
    method, properties, body = channel.basic_get(q["alice"], auto_ack=True)
    history = properties.headers[dlq.HISTORY_HEADER]
    assert [h["reason"] for h in history] == ["changes run failed 5 times; last error: Vault unreachable",
                                              "changes run failed 5 times; last error: again"]
    assert depth(setup, "dlq", 3) == 3


def test_replay_to_a_queue_that_is_gone_keeps_the_message_and_says_so(setup):
    fill(setup)
    q = setup.queues
    setup.broker._connection.channel().queue_delete(q["bob"])
    result = cli(setup, "replay", "--queue", q["bob"])
    assert result.returncode == 1
    assert "queue %r does not exist" % q["bob"] in result.stdout
    assert "replayed 0 message(s) to their queues; 1 could not be replayed; 4 left" in result.stdout
    assert depth(setup, "dlq", 4) == 4


class Terminal(io.StringIO):
    def isatty(self):
        return True


def purge(setup, answer, *args):
    parsed = __import__("cvmfs_publisher_consumer.cli", fromlist=["parser"]).parser().parse_args(
        ["dlq", "purge", *args])
    out = io.StringIO()
    rc = dlq.run(setup.config, parsed, stdin=Terminal(answer), out=out)
    return rc, out.getvalue()


def test_purge_asks_unless_yes_and_reports_counts(setup):
    fill(setup)
    q = setup.queues
    refused = cli(setup, "purge", "--repository", q["alice"])
    assert refused.returncode == 1 and "2 message(s) match; not a terminal" in refused.stderr
    assert depth(setup, "dlq", 4) == 4
    rc, out = purge(setup, "n\n", "--repository", q["alice"])
    assert rc == 1 and "delete 2 message(s) from %s for good? [y/N] nothing deleted" % q["dlq"] in out
    assert depth(setup, "dlq", 4) == 4
    rc, out = purge(setup, "y\n", "--repository", q["alice"])
    assert rc == 0 and "purged 2 message(s); 2 left in %s" % q["dlq"] in out
    assert depth(setup, "dlq", 2) == 2
    result = cli(setup, "purge", "--yes", "--older-than", "1d")
    assert result.returncode == 0 and "purged 1 message(s); 1 left" in result.stdout
    assert json.loads(cli(setup, "list", "--json").stdout)[0]["origin"] == q["publisher"]
    assert "purged 1 message(s); 0 left" in cli(setup, "purge", "--yes").stdout
    assert depth(setup, "dlq", 0) == 0
