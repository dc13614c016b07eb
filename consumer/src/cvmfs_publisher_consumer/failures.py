"""What a failed run does to its messages, and the dead letters a later full sync supersedes.

A message that can never succeed (unreadable) goes straight to the dead-letter queue, for an operator.

A failed sync run's messages are retried later with backoff (``RetryPolicy``) until their attempts run out, then
dead-lettered as transient failures. A repository with transient dead letters (also ones an earlier daemon left)
gets a full sync as soon as it may run; when one succeeds, those dead letters are removed: the repository is
published as the bucket is, so they are superseded. A failed provisioning run (a registry entry) is retried here
with the same backoff until its attempts run out; then it waits for the next replay of the registry (registry.py).
Used only from the daemon's I/O thread.
"""
import logging
from typing import Dict, Set

import pika.exceptions

from . import amqp
from .batching import Batch, RetryPolicy, Scheduler
from .logs import fields
from .messages import short_name
from .metrics import Metrics
from .registry import Registry

log = logging.getLogger("cvmfs_publisher")


class Failures:
    def __init__(self, broker, metrics: Metrics, scheduler: Scheduler, retry: RetryPolicy, registry: Registry):
        self.broker = broker
        self.metrics = metrics
        self.scheduler = scheduler
        self.retry = retry
        self.registry = registry
        self.dead_lettered: Set[str] = set()   # repositories with transient dead letters a full sync supersedes

    def malformed(self, delivery: amqp.Delivery, label: str, reason: str, repository: str = ""):
        """A message that can never succeed: straight to the dead-letter queue."""
        log.warning("dead-lettering a message from %s: %s", delivery.queue, reason,
                    extra=fields(event="dead_letter", queue=delivery.queue, repository=repository, reason=reason,
                                 count=1, cause=amqp.MALFORMED))
        if self.broker.dead_letter(delivery, reason, amqp.attempts_of(delivery.properties), amqp.MALFORMED):
            self.metrics.dead_lettered.labels(label, "malformed").inc()

    def find_left(self, repositories: Dict[str, str]):
        """Repositories (short name -> fqrn) left with transient dead letters, also by an earlier run of the
        daemon: a full sync each."""
        for origin, count in self.broker.sweep_dead_letters().items():
            fqrn = repositories.get(origin)
            if fqrn and fqrn not in self.dead_lettered:
                log.info("%d dead-lettered message(s) of %s: a full sync will supersede them", count, fqrn,
                         extra=fields(event="reconcile_scheduled", repository=fqrn, count=count))
                self.dead_lettered.add(fqrn)
                self.scheduler.reconcile_soon(fqrn)

    def after_failure(self, batch: Batch, error: str, label: str, now: float):
        """Each message of a failed sync run: retried later, or dead-lettered once its attempts are spent (and
        then a full sync of the repository supersedes them). Provisioning runs: ``after_failed_provision``."""
        dead, reason = 0, ""
        for message in batch.messages:
            decision = self.retry.after_failure(message, now)
            if decision.action == "dead-letter":
                reason = "%s run failed %d times; last error: %s" % (batch.mode, decision.attempts, error)
                if self.broker.dead_letter(message.ref, reason, decision.attempts, amqp.TRANSIENT):
                    self.metrics.dead_lettered.labels(label, "failed").inc()
                    dead += 1
            elif self.broker.retry_later(message.ref, decision.attempts, decision.not_before):
                self.metrics.retried.labels(label).inc()
        if dead:
            log.error("dead-lettered %d message(s) of %s: %s", dead, batch.lane, reason,
                      extra=fields(event="dead_letter", repository=batch.lane, reason=reason, count=dead,
                                   cause=amqp.TRANSIENT))
            self.dead_lettered.add(batch.lane)
            self.scheduler.reconcile_soon(batch.lane)

    def after_failed_provision(self, batch: Batch, error: str, label: str, now: float):
        """A registry entry that failed here is retried here (the registry is shared: nothing goes back to it);
        after ``sync.max_attempts`` it waits for the next replay (next connection or daemon start)."""
        for message in batch.messages:
            decision = self.retry.after_failure(message, now)
            if decision.action == "retry":
                message.attempts, message.not_before = decision.attempts, decision.not_before
                self.scheduler.add(batch.lane, message)
                self.metrics.retried.labels(label).inc()
            else:
                self.registry.finished(message.request, succeeded=False)
                log.error("giving up provisioning %s after %d failed runs until the registry is read again: %s",
                          batch.lane, decision.attempts, error,
                          extra=fields(event="provision_given_up", repository=batch.lane, error=error))

    def after_full_sync(self, fqrn: str):
        """A full sync of ``fqrn`` succeeded: its transient dead letters, if any, are superseded."""
        if fqrn not in self.dead_lettered:
            return
        try:
            removed = self.broker.sweep_dead_letters(remove_from={short_name(fqrn)}).get(short_name(fqrn), 0)
        except pika.exceptions.AMQPChannelError as exc:
            log.warning("could not clear the dead letters of %s: %s", fqrn, exc,
                        extra=fields(event="dead_letters_kept", repository=fqrn))
            return
        self.dead_lettered.discard(fqrn)
        log.info("full sync of %s succeeded: removed its %d dead-lettered message(s)", fqrn, removed,
                 extra=fields(event="dead_letters_cleared", repository=fqrn, count=removed))
