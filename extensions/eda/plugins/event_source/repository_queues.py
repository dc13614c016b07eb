"""Event-Driven Ansible source: the cvmfs-publisher queues as rulebook events.

``infn_cloud.cvmfs_publisher.repository_queues`` reads the provisioning queue and each repository's queue (RGW's
and AWS's S3 event forms) and puts one event per provisioning request and per batch of S3 events of a repository
on the rulebook's queue, already in the shape the daemon gives its playbooks::

    {"cvmfs_publisher": {"action": "provision" | "sync", "repository": "alice.infn.it",
                         "playbook": "provision_repository" | "sync_repository",
                         "extravars": {...the playbook's variables...}, "messages": 3}}

so a rule runs ``run_playbook`` with those ``extravars`` (extensions/eda/rulebooks/publish_repositories.yml).

One parser: messages are read by the consumer daemon's own code (``cvmfs_publisher_consumer.messages``: the
plain-text and JSON provisioning forms, both S3 event forms, the hostile-key checks), not a copy. The collection
ships the consumer's source in ``consumer/``; this plugin imports it from there, so the source, the playbooks and
the parser always come from the same collection version. (The consumer never imports the collection: the
dependency goes one way.) Only if that folder is missing does it use a ``cvmfs_publisher_consumer`` installed in
the decision environment. It needs ``pika`` and ``PyYAML`` there.

Delivery guarantee, plainly: EDA gives a source no playbook result, so a message is acked as soon as its event is on
the rulebook's queue, before any playbook runs. A run that fails, or an ansible-rulebook that dies with events
queued, loses those events. What makes this safe is the periodic full reconcile: every ``full_reconcile_interval``
seconds (default 1 h; 0 disables) the source emits a ``full`` sync event for every repository it consumes, which
publishes the bucket's state whatever events were lost. Malformed messages go to the dead-letter queue with the
reason in headers, and refused object keys are logged and skipped, as the daemon does. Use the daemon where the
stronger guarantee (ack after the run succeeded, retries with backoff) matters.

Arguments (connection settings mirror the daemon's ``amqp.*`` configuration keys), given one by one or all in
one mapping ``settings``:

host, port (5671), vhost (/), user, password_file, tls (true), ca_cert, client_cert, client_key,
server_hostname, heartbeat (60)
    the broker; the password is read from ``password_file``, never given as a value.
publisher_queue (publisher), dead_letter_queue (cvmfs-publisher.dlq)
    the provisioning queue (declared if missing) and where malformed messages go.
repositories ([])
    fqrns whose queues are consumed from the start; plus those provisioned through this source (their queue is
    consumed once the playbook created it) and, with ``config_dir``, those found there.
config_dir (""), include (["*"]), rescan_interval (10)
    when ansible-rulebook runs on the publisher host: discover repositories in cvmfs_server's repositories.d,
    as the daemon does, every ``rescan_interval`` seconds.
prefix (cvmfs/), domain ("")
    the bucket prefix that is published; if set, provisioning accepts only ``<name>.<domain>``.
full_reconcile_interval (3600), full_sync_threshold (500)
    periodic full syncs (see above); a batch with this many distinct keys becomes one full sync.
batch_window (0.5)
    seconds to gather a repository's events into one sync event (RGW sends one message per object).
prefetch (1000)
    unacknowledged messages per queue while a batch is gathered.
"""
import asyncio
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

_BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), *[os.pardir] * 4, "consumer", "src")
if os.path.isfile(os.path.join(_BUNDLED, "cvmfs_publisher_consumer", "messages.py")):
    sys.path.insert(0, os.path.normpath(_BUNDLED))

import pika.exceptions  # noqa: E402

from cvmfs_publisher_consumer import amqp, contract, messages  # noqa: E402
from cvmfs_publisher_consumer.config import FIELDS, REQUIRED, read_secret  # noqa: E402
from cvmfs_publisher_consumer.repositories import discover_repositories, included  # noqa: E402

log = logging.getLogger("cvmfs_publisher.eda")

DEFAULTS = {
    "publisher_queue": "publisher", "dead_letter_queue": "cvmfs-publisher.dlq", "repositories": [],
    "config_dir": "", "include": ["*"], "rescan_interval": 10.0, "prefix": "cvmfs/", "domain": "",
    "full_reconcile_interval": 3600.0, "full_sync_threshold": 500, "batch_window": 0.5, "prefetch": 1000,
}
AMQP_KEYS = {key[len("amqp."):]: field for key, field in FIELDS.items() if key.startswith("amqp.")}
LOOP_SECONDS = 0.2


def settings_from(args: Dict[str, Any]) -> Dict[str, Any]:
    """The source's settings: ``args`` over the defaults; ValueError names a missing or unknown argument.

    ``args["settings"]``, a mapping of the same arguments, lets a rulebook pass them all from one variable
    (source arguments must be a mapping, so ``"{{ cvmfs_publisher_eda }}"`` alone cannot be); explicit
    arguments win over it."""
    nested = args.get("settings") or {}
    if not isinstance(nested, dict):
        raise ValueError("repository_queues: argument 'settings' must be a mapping, got %r" % type(nested).__name__)
    args = dict(nested, **{key: value for key, value in args.items() if key != "settings"})
    known = set(DEFAULTS) | set(AMQP_KEYS)
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError("repository_queues: unknown argument %r" % unknown[0])
    settings = dict(DEFAULTS)
    for key, field in AMQP_KEYS.items():
        if key in args:
            settings[key] = args[key]
        elif field.default is REQUIRED:
            raise ValueError("repository_queues: argument %r is required" % key)
        else:
            settings[key] = field.default
    settings.update({key: args[key] for key in DEFAULTS if key in args})
    for key in ("port", "heartbeat", "full_sync_threshold", "prefetch"):
        settings[key] = int(settings[key])
    for key in ("rescan_interval", "full_reconcile_interval", "batch_window", "connection_timeout"):
        settings[key] = float(settings[key])
    if isinstance(settings["tls"], str):
        settings["tls"] = settings["tls"].lower() in ("1", "true", "yes")
    for fqrn in settings["repositories"]:
        messages.validate_fqrn(fqrn, settings["domain"])
    return settings


def provision_event(request: messages.ProvisionRequest, count: int = 1) -> Dict:
    return {"cvmfs_publisher": {"action": "provision", "repository": request.repository,
                                "playbook": "provision_repository", "extravars": contract.provision(request)[1],
                                "messages": count}}


def sync_event(fqrn: str, keys: List[str], threshold: int, count: int, full: bool = False) -> Dict:
    """The sync_repository.yml variables the daemon would pass for this batch."""
    full = full or (threshold and len(keys) >= threshold)
    extravars = contract.sync(fqrn, "full" if full else "changes", keys)[1]
    return {"cvmfs_publisher": {"action": "sync", "repository": fqrn, "playbook": "sync_repository",
                                "extravars": extravars, "messages": count}}


class QueueSource:
    """The broker side, on its own thread (pika's BlockingConnection): gather, hand over, then ack."""

    def __init__(self, settings: Dict[str, Any], hand_over: Callable[[Dict], None], clock=time.monotonic):
        self.settings = settings
        self.hand_over = hand_over
        self.clock = clock
        self.stopping = threading.Event()
        self.repositories: Dict[str, str] = {messages.short_name(f): f for f in settings["repositories"]}
        self._gathered: List = []     # (fqrn or None, delivery, provision request or keys)
        self._first_gathered = 0.0
        self._next_rescan = 0.0
        self._next_reconcile = clock() + settings["full_reconcile_interval"]
        self._broker = None

    # -- connection ---------------------------------------------------------------------------------------

    def run(self):
        delay = 1.0
        while not self.stopping.is_set():
            broker = amqp.Broker(amqp.connection_parameters(self.settings, read_secret(self.settings["password_file"])),
                                 self.settings["dead_letter_queue"])
            self._broker = broker
            try:
                broker.connect()
                broker.ensure_queue(self.settings["publisher_queue"])
                broker.consume(self.settings["publisher_queue"], self.settings["prefetch"], self._on_provision)
                log.info("connected; consuming %s", self.settings["publisher_queue"])
                self._next_rescan, delay = 0.0, 1.0
                while not self.stopping.is_set():
                    broker.process(LOOP_SECONDS)
                    self._subscribe_all(broker)
                    self._flush(broker)
                    self._reconcile()
            except amqp.CONNECTION_ERRORS + (pika.exceptions.AMQPError,) as exc:
                log.warning("RabbitMQ connection lost or refused (%s); reconnecting in %.0fs", type(exc).__name__,
                            delay)
                self._gathered = []   # unacked: the broker redelivers them
                self.stopping.wait(delay)
                delay = min(delay * 2, 60.0)
            finally:
                broker.close()

    def _subscribe_all(self, broker):
        now = self.clock()
        if now < self._next_rescan:
            return
        self._next_rescan = now + self.settings["rescan_interval"]
        if self.settings["config_dir"]:
            self.repositories.update(discover_repositories(self.settings["config_dir"], self.settings["include"]))
        for short, fqrn in sorted(self.repositories.items()):
            if not broker.consuming(short) and broker.consume(short, self.settings["prefetch"],
                                                              lambda d, fqrn=fqrn: self._on_event(fqrn, d)):
                log.info("consuming %s (%s)", short, fqrn)

    # -- messages -----------------------------------------------------------------------------------------

    def _gather(self, item):
        if not self._gathered:
            self._first_gathered = self.clock()
        self._gathered.append(item)

    def _on_provision(self, delivery):
        try:
            request = messages.parse_provision(delivery.body, self.settings["domain"])
        except messages.MessageError as exc:
            self._reject(delivery, str(exc))
            return
        self._gather((None, delivery, request))

    def _on_event(self, fqrn, delivery):
        try:
            touches = messages.touched_keys(messages.parse_s3_event(delivery.body), bucket=delivery.queue,
                                            prefix=self.settings["prefix"], known_buckets=set(self.repositories))
        except messages.MessageError as exc:
            self._reject(delivery, str(exc))
            return
        for reason in touches.ignored:
            log.info("event record ignored: %s", reason)
        for key, reason in touches.refused:   # never published (hostile key): the rest of the message goes on
            log.warning("object refused: %s: %s", key, reason)
        self._gather((fqrn, delivery, touches.keys))

    def _reject(self, delivery, reason):
        log.warning("dead-lettering a message from %s: %s", delivery.queue, reason)
        self._broker.dead_letter(delivery, reason, amqp.attempts_of(delivery.properties), amqp.MALFORMED)

    def _flush(self, broker):
        """Hand the gathered messages over as events (one per provisioning request, one per repository), each
        acked once the engine has its event."""
        if not self._gathered or self.clock() - self._first_gathered < self.settings["batch_window"]:
            return
        gathered, self._gathered = self._gathered, []
        syncs: Dict[str, List] = {}
        for fqrn, delivery, what in gathered:
            if fqrn is None:
                log.info("event: provision %s", what.repository)
                self.hand_over(provision_event(what))
                broker.ack(delivery)
                short = messages.short_name(what.repository)
                if short not in self.repositories and included(what.repository, self.settings["include"]):
                    self.repositories[short] = what.repository   # consumed once the playbook made its queue
                    self._next_rescan = 0.0
            else:
                syncs.setdefault(fqrn, []).append((delivery, what))
        for fqrn, items in syncs.items():
            keys = list(dict.fromkeys(key for _delivery, batch in items for key in batch))
            if keys:
                log.info("event: sync %s (%d key(s) from %d message(s))", fqrn, len(keys), len(items))
                self.hand_over(sync_event(fqrn, keys, self.settings["full_sync_threshold"], len(items)))
            for delivery, _keys in items:
                broker.ack(delivery)

    def _reconcile(self):
        interval = self.settings["full_reconcile_interval"]
        if not interval or self.clock() < self._next_reconcile:
            return
        self._next_reconcile = self.clock() + interval
        for fqrn in sorted(self.repositories.values()):
            log.info("event: full sync %s (periodic reconcile)", fqrn)
            self.hand_over(sync_event(fqrn, [], 0, 0, full=True))


async def main(queue: asyncio.Queue, args: Dict[str, Any]):
    """ansible-rulebook's entry point: runs until the rulebook stops (cancels it)."""
    settings = settings_from(args)
    # pika logs every channel it opens, and a 404 for each look at a queue not created yet.
    logging.getLogger("pika").setLevel(logging.ERROR)
    loop = asyncio.get_running_loop()

    def hand_over(event: Dict):
        # Blocks the broker thread until the engine's queue has the event; only then is the message acked.
        asyncio.run_coroutine_threadsafe(queue.put(event), loop).result()

    source = QueueSource(settings, hand_over)
    finished: "asyncio.Future[Optional[BaseException]]" = loop.create_future()

    def thread():
        error = None
        try:
            source.run()
        except BaseException as exc:  # noqa: BLE001 -- reported to the rulebook below
            error = exc
        loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(error))

    threading.Thread(target=thread, name="repository_queues", daemon=True).start()
    try:
        error = await finished
        if error:
            raise error
    finally:
        source.stopping.set()


if __name__ == "__main__":
    # Print the events of a broker for a look: python repository_queues.py <args as JSON>
    import json

    class _Printer:
        async def put(self, event):
            print(json.dumps(event), flush=True)

    asyncio.run(main(_Printer(), json.loads(sys.argv[1])))
