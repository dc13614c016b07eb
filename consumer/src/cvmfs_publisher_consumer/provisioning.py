"""Provisioning requests, on every publisher host (the registry itself, and why a stream: registry.py).

A request arrives on the provisioning queue (``queues.publisher``), where the hosts compete for it: the host that
gets it checks it and appends it, unchanged, to the registry stream (``queues.registry``). Every host reads the
registry from its first entry on every connection, and an entry becomes a provisioning run here unless this host
applied it already. A request that can never be read is dead-lettered; a failed run is retried here
(failures.py). Every ``provisioning.reapply_interval`` each request applied here runs again: provisioning is
idempotent, so such a run changes nothing unless something changed behind the publisher's back (RGW 16.2 lets any
user re-point or delete a topic, see docs/operator-guide.md "Rights"), which it repairs and reports as drift
(``provisioning_drift`` in the log, ``cvmfs_publisher_provisioning_drift_total``). Used only from the daemon's I/O
thread.
"""
import logging

from . import amqp
from .batching import PROVISION, Pending, Scheduler
from .failures import Failures
from .logs import fields
from .messages import MessageError, ProvisionRequest, parse_provision
from .metrics import PUBLISHER, Metrics
from .registry import Registry, RegistryRef
from .repositories import included

log = logging.getLogger("cvmfs_publisher")

REGISTRY_PREFETCH = 100   # registry entries in flight while replaying the stream


class Provisioning:
    def __init__(self, broker, config, registry: Registry, scheduler: Scheduler, metrics: Metrics,
                 failures: Failures):
        self.broker = broker
        self.queue = config["queues.publisher"]
        self.exchange = config["queues.provisioning_exchange"]
        self.prefetch = config["queues.publisher_prefetch"]
        self.stream = config["queues.registry"]
        self.domain = config["repositories.domain"]
        self.include = config["repositories.include"]
        self.registry = registry
        self.scheduler = scheduler
        self.metrics = metrics
        self.failures = failures
        self.reapply_interval = config["provisioning.reapply_interval"]
        self.next_reapply = None   # set on the first look: no re-apply right after start (the replay does it)

    def consume(self):
        """On every connection: consume the provisioning queue, and replay the registry from its first entry (what
        this host missed is applied now)."""
        problem = self.broker.ensure_queue(self.queue)
        if problem:
            log.warning("provisioning queue exists with other arguments: %s", problem,
                        extra=fields(event="queue_arguments", queue=self.queue))
        problem = self.exchange and self.broker.ensure_exchange_binding(self.exchange, self.queue)
        if problem:
            log.error("cannot bind the provisioning queue to the exchange %s: %s", self.exchange, problem,
                      extra=fields(event="provisioning_exchange_unusable", exchange=self.exchange))
        self.broker.consume(self.queue, self.prefetch, self.on_request)
        problem = self.broker.ensure_stream(self.stream)
        if problem:
            log.error("the registry %s is not a stream: %s", self.stream, problem,
                      extra=fields(event="registry_unusable", queue=self.stream))
        else:
            self.broker.consume(self.stream, REGISTRY_PREFETCH, self.on_entry, arguments={"x-stream-offset": "first"})

    def on_request(self, delivery: amqp.Delivery):
        """A message of the provisioning queue: checked, then added to the registry (every host applies it)."""
        self.metrics.received.labels(PUBLISHER).inc()
        try:
            request = parse_provision(delivery.body, self.domain)
        except MessageError as exc:
            self.failures.malformed(delivery, PUBLISHER, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 -- no input may crash the daemon
            self.failures.malformed(delivery, PUBLISHER, "unexpected error reading the message: %s"
                                    % type(exc).__name__)
            log.exception("unexpected error reading a provisioning message")
            return
        log.info("provisioning request for %s", request.repository,
                 extra=fields(event="provision_request", repository=request.repository, form=request.form,
                              kind="personal" if request.subject else "group"))
        if self.broker.forward(delivery, self.stream):
            self.metrics.acked.labels(PUBLISHER).inc()
            log.info("provisioning request for %s added to the registry", request.repository,
                     extra=fields(event="provision_registered", repository=request.repository))

    def on_entry(self, delivery: amqp.Delivery):
        """An entry of the registry: a provisioning run here unless that was done already."""
        self.broker.ack(delivery)   # a stream keeps its entries; the ack only lets the next ones come
        try:
            request = parse_provision(delivery.body, self.domain)
        except MessageError as exc:  # checked before it was added: another domain, or added by hand
            log.warning("skipping registry entry: %s", exc, extra=fields(event="registry_entry_skipped"))
            return
        if not included(request.repository, self.include):
            return
        if not self.registry.wanted(request):
            self.registry.remember(request)   # applied by an older daemon that kept no requests: re-applied from now
            return
        offset = amqp.header(delivery.properties, "x-stream-offset", 0)
        log.info("provisioning %s from the registry", request.repository,
                 extra=fields(event="registry_entry", repository=request.repository, offset=offset))
        self._schedule(request, RegistryRef(offset))

    def _schedule(self, request, ref: RegistryRef):
        """A provisioning run of ``request`` (noted as waiting, so a replay meanwhile does not queue it twice)."""
        self.registry.queued(request)
        self.scheduler.add(request.repository, Pending(ref=ref, kind=PROVISION, request=request))

    def reapply_due(self, now: float):
        """Every ``provisioning.reapply_interval``: queue a run of each request applied here (registry.py keeps
        them), unless that repository's provisioning is waiting or running already."""
        if not self.reapply_interval:
            return
        if self.next_reapply is None:
            self.next_reapply = now + self.reapply_interval
        if now < self.next_reapply:
            return
        self.next_reapply = now + self.reapply_interval
        requests = []
        for stored in self.registry.to_reapply():
            try:
                requests.append(ProvisionRequest(**stored))
            except TypeError:   # registry.json edited by hand: the next replay of the registry stores it again
                log.warning("cannot re-apply a stored request: %s", sorted(stored),
                            extra=fields(event="reapply_skipped"))
        if requests:
            log.info("applying the provisioning of %d repositories again", len(requests),
                     extra=fields(event="reapply", repositories=len(requests)))
        for request in requests:
            self._schedule(request, RegistryRef(-1, reapply=True))

    def succeeded(self, batch, result):
        """A provisioning run succeeded: remembered; a re-apply that had to change something is drift, repaired."""
        self.registry.finished(batch.request, succeeded=True)
        changed = sum((result.stats or {}).get("changed", {}).values())
        if reapplied(batch) and changed:
            self.metrics.provisioning_drift.labels(batch.lane).inc()
            log.warning("provisioning of %s had drifted: its re-apply changed %d thing(s), now repaired (a topic, "
                        "bucket notification, queue, key or repository was changed or removed since)", batch.lane,
                        changed, extra=fields(event="provisioning_drift", repository=batch.lane, changed=changed))


def reapplied(batch) -> bool:
    """Whether ``batch`` is a periodic re-apply (not a request this host had not applied yet)."""
    return any(isinstance(message.ref, RegistryRef) and message.ref.reapply for message in batch.messages)
