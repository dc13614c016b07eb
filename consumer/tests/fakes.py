"""The daemon tests' fakes: a broker held to amqp.Broker's signatures, a runner whose runs the test releases, and
helpers to wait for runs (used through the ``daemon`` fixture of conftest.py)."""
import inspect
import json
import threading
import time
from unittest import mock

import pika
import pika.exceptions

from cvmfs_publisher_consumer import amqp
from cvmfs_publisher_consumer.runner import RunResult


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
        self.bindings = set()       # (exchange, queue): the provisioning exchange's binding

    def ensure_stream(self, queue):
        self.streams.setdefault(queue, [])
        self.queues.add(queue)

    def connect(self, declare_dead_letter=True):
        self.is_open = True

    def ensure_queue(self, queue):
        self.queues.add(queue)

    def ensure_exchange_binding(self, exchange, queue):
        self.bindings.add((exchange, queue))

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
                         refusals=self.refusals.pop(0) if getattr(self, "refusals", None) else None,
                         stats=self.stats.pop(0) if getattr(self, "stats", None) else {})


REGISTRY = "cvmfs-publisher.registry"


def event(key, bucket="alice", name="ObjectCreated:Put"):
    return json.dumps({"Records": [{"eventName": name, "s3": {"bucket": {"name": bucket},
                                                              "object": {"key": key, "size": 1}}}]}).encode()


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


def logged(caplog, event):
    return [record.fields for record in caplog.records if (getattr(record, "fields", None) or {}).get("event") == event]
