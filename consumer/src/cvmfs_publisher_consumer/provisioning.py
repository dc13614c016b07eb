"""Provisioning requests, on every publisher host (the registry itself, and why a stream: registry.py).

A request arrives on the provisioning queue (``queues.publisher``), where the hosts compete for it: the host that
gets it checks it and appends it, unchanged, to the registry stream (``queues.registry``). Every host reads the
registry from its first entry on every connection, and an entry becomes a provisioning run here unless this host
applied it already. A request that can never be read is dead-lettered; a failed run is retried here
(failures.py). Used only from the daemon's I/O thread.
"""
import logging

from . import amqp
from .batching import PROVISION, Pending, Scheduler
from .failures import Failures
from .logs import fields
from .messages import MessageError, parse_provision
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
        if not included(request.repository, self.include) or not self.registry.wanted(request):
            return
        self.registry.queued(request)
        offset = amqp.header(delivery.properties, "x-stream-offset", 0)
        log.info("provisioning %s from the registry", request.repository,
                 extra=fields(event="registry_entry", repository=request.repository, offset=offset))
        self.scheduler.add(request.repository, Pending(ref=RegistryRef(offset), kind=PROVISION, request=request))
