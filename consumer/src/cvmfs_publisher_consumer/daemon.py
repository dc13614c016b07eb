"""The daemon: queues in, ansible-runner runs out, every message settled only when its work is done.

Read top to bottom like kombu's ConsumerMixin: ``run`` (connect, serve, reconnect), the loop, the message
callbacks, then starting and settling runs. Which queues it consumes is subscriptions.py's, provisioning requests
and the registry provisioning.py's, running playbooks workers.py's, what a failed run or an unreadable message does
failures.py's, refused objects refusals.py's, the spread over hosts spread.py's.

Threads: the main thread is the I/O thread (pika BlockingConnection, the scheduler, acks, the status file);
``sync.max_parallel`` worker threads (workers.py) run playbooks and hand results back to it. Nothing but the I/O
thread touches the broker or the scheduler, so neither needs a lock.
"""
import logging
import os
import signal
import socket
import time
from functools import partial
from typing import Dict

import pika.exceptions

from . import amqp, guard, spread
from .batching import CHANGES, FULL, PROVISION, Batch, Pending, RetryPolicy, Scheduler, reconnect_delays
from .config import Config, read_secret
from .depths import DepthProbe
from .failures import Failures
from .logs import fields
from .messages import MessageError, parse_s3_event, short_name, touched_keys
from .metrics import PUBLISHER, REPOSITORY, Metrics
from .provisioning import Provisioning, reapplied
from .redact import known_secrets
from .refusals import Refusals
from .registry import Registry
from .repositories import included
from .runner import PlaybookRunner, RunResult
from .status import StatusFile, read_status
from .statuspage import render as render_status_page
from .subscriptions import Subscriptions
from .workers import Workers

log = logging.getLogger("cvmfs_publisher")

LOOP_SECONDS = 0.1        # longest wait before a finished run is settled (the workers also wake the loop)


class Daemon:
    def __init__(self, config: Config, broker: amqp.Broker = None, runner: PlaybookRunner = None,
                 metrics: Metrics = None, clock=time.time):
        self.config = config
        self.clock = clock
        state_dir = config["state_dir"]
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        password = read_secret(config["amqp.password_file"])
        self.host_id = config["cluster.host_id"] or socket.gethostname()
        self.broker = broker or amqp.Broker(amqp.connection_candidates(config.section("amqp"), password),
                                            config["queues.dead_letter"], host_id=self.host_id)
        self.registry = Registry(state_dir, config["repositories.config_dir"])
        self.looker = None   # who is active for what, read from the management API (spread.py)
        if config["cluster.management_urls"] and config["cluster.spread_interval"]:
            self.looker = spread.Looker(spread.ManagementApi(config["cluster.management_urls"], config["amqp.vhost"],
                                                             config["amqp.user"], password, config["amqp.ca_cert"]),
                                        config["cluster.spread_interval"])
        self.placement: Dict = {}   # spread.summary of the last look: active, standby, hosts
        self.metrics = metrics or Metrics()
        self.status = StatusFile(state_dir, clock=clock)
        self.retry = RetryPolicy(config["sync.max_attempts"], config["sync.retry_initial_delay"],
                                 config["sync.retry_max_delay"])
        self.scheduler = Scheduler(config["sync.max_parallel"], config["sync.full_reconcile_interval"],
                                   config["sync.full_sync_threshold"], backoff=self.retry.delay,
                                   active=self._active_here)
        self.failures = Failures(self.broker, self.metrics, self.scheduler, self.retry, self.registry)
        self.provisioning = Provisioning(self.broker, config, self.registry, self.scheduler, self.metrics,
                                         self.failures)
        self.refusals = Refusals(self.metrics, self.status)
        self.subscriptions = Subscriptions(self.broker, config, lambda fqrn: partial(self._on_sync_message, fqrn),
                                           self._subscribed, held_back=self.status.provisioning_unfinished)
        self.runner = runner or PlaybookRunner(config.section("ansible"), state_dir, secrets=known_secrets(config))
        self.workers = Workers(self.runner, config["sync.max_parallel"], wake=lambda: self.broker.wake(lambda: None))
        self.depths = DepthProbe()
        self.stopping = False

    # -- lifecycle ------------------------------------------------------------------------------------------

    def request_stop(self, signum=None, _frame=None):
        if not self.stopping:
            log.info("stopping", extra=fields(event="stopping", signal=signum))
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        if self.config["metrics.port"]:
            self.metrics.serve(self.config["metrics.address"], self.config["metrics.port"], page=self.status_page)
        log.info("starting", extra=fields(event="starting", pid=os.getpid(), config=self.config.path))
        guard.log_isolation(log)
        delays = None
        while not self.stopping:
            try:
                self._connect()
                delays = None
                self._serve()
            except amqp.CONNECTION_ERRORS + (pika.exceptions.AMQPError,) as exc:
                # Any broker trouble not handled where it happened: start over on a fresh connection.
                self._disconnected(exc)
                if self.stopping:
                    break
                delays = delays or reconnect_delays(self.config["amqp.reconnect_initial_delay"],
                                                    self.config["amqp.reconnect_max_delay"])
                self._wait(next(delays))
        self._shutdown()
        return 0

    def _connect(self):
        self.broker.connect()
        self.metrics.set_connected(True)
        log.info("connected to RabbitMQ", extra=fields(event="connected", host=self.config["amqp.host"],
                                                       port=self.config["amqp.port"]))
        self.provisioning.consume()
        self.subscriptions.rescan_now()
        if self.looker:
            self.looker.later()
        self._rescan()
        self.failures.find_left(self.subscriptions.repositories)
        self._save_status()

    def _disconnected(self, exc):
        was_connected = self.metrics.is_connected
        self.metrics.set_connected(False)
        detail = amqp.connection_error_text(exc)
        if was_connected:
            log.warning("RabbitMQ connection lost: %s", detail,
                        extra=fields(event="disconnected", error_type=type(exc).__name__))
        else:
            log.warning("cannot connect to RabbitMQ at %s:%s: %s", self.config["amqp.host"], self.config["amqp.port"],
                        detail, extra=fields(event="connect_failed", error_type=type(exc).__name__))
        self.broker.close()
        # Unsettled messages come back from the broker on the next connection; running batches go on, and
        # their messages will simply be redelivered (a sync run is idempotent). Registry entries come back with
        # the replay of the registry.
        self.registry.drop_waiting(self.scheduler.drain())
        self.placement = {}
        self._save_status()

    def _wait(self, seconds: float):
        """Sleep between reconnects while still settling the runs that finish meanwhile."""
        log.info("reconnecting in %.1fs", seconds, extra=fields(event="reconnect_wait", delay=round(seconds, 2)))
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            self._settle_finished(timeout=min(0.5, max(0.0, deadline - time.monotonic())))

    def _serve(self):
        while not self.stopping:
            self.broker.process(LOOP_SECONDS)
            self.metrics.tick()
            self._settle_finished()
            self._start_ready()
            self._rescan()
            self._probe_depths()
            self._spread()
            self.provisioning.reapply_due(self.clock())

    def _shutdown(self):
        """Stop consuming, let running runs finish for ``shutdown_grace`` seconds, then cancel them; every
        message not acked by then goes back to its queue."""
        try:
            if self.broker.is_open:
                self.broker.stop_consuming()
                for message in self.registry.drop_waiting(self.scheduler.drain()):
                    self.broker.requeue(message.ref)
        except amqp.CONNECTION_ERRORS as exc:
            self._disconnected(exc)
        deadline = time.monotonic() + self.config["shutdown_grace"]
        while self.workers.in_flight and time.monotonic() < deadline:
            self._pump()
        if self.workers.in_flight:
            log.warning("cancelling %d run(s) still going after %.0fs", self.workers.in_flight,
                        self.config["shutdown_grace"], extra=fields(event="cancel_runs"))
            self.workers.cancel = True
            while self.workers.in_flight:
                self._pump()
        self.workers.shutdown()
        if self.looker:
            self.looker.close()
        self.broker.close()
        self.metrics.set_connected(False)
        self._save_status()
        log.info("stopped", extra=fields(event="stopped"))

    def _pump(self):
        """One turn of the shutdown loop: keep the connection alive and settle what finished."""
        if not self.broker.is_open:
            self._settle_finished(timeout=LOOP_SECONDS)
            return
        try:
            self.broker.process(LOOP_SECONDS)
            self._settle_finished()
        except amqp.CONNECTION_ERRORS as exc:
            self._disconnected(exc)

    # -- repositories ---------------------------------------------------------------------------------------

    def _rescan(self):
        if self.subscriptions.rescan():
            self.metrics.repositories.set(len(self.subscriptions.consumed()))

    def _subscribed(self, fqrn: str, first: bool):
        if first:
            last = self.status.repository(fqrn).get("last_publish")
            if last:  # the metric survives a restart, so "behind" alerts compare against the real last publish
                self.metrics.last_publish.labels(fqrn).set(last)
        self.scheduler.track(fqrn, self.clock())

    def _spread(self):
        """Every ``cluster.spread_interval``: look at who is active for what (read in the background), then give up
        the positions above this host's fair share (spread.py)."""
        if self.looker is None:
            return
        try:
            view = self.looker.poll()
        except OSError as exc:
            log.warning("cannot read who is active for what from the management API: %s", exc,
                        extra=fields(event="spread_view_failed", error_type=type(exc).__name__))
            return
        if view is None:
            return
        queues = self.subscriptions.consumed()
        for short in spread.to_give_up(view, self.host_id, queues, self._idle):
            self.subscriptions.give_up(short)
            self.metrics.given_up.inc()
            view.active.pop(short, None)
            view.standby.setdefault(short, set()).add(self.host_id)
        repositories = self.subscriptions.repositories
        self.placement = spread.summary(view, self.host_id, queues)
        self.metrics.set_placement(self.placement, repositories)
        for short in queues:   # the status page's "active on" column
            self.status.repository(repositories[short])["active_host"] = view.active.get(short, "")
        self._save_status()

    def _active_here(self, fqrn: str) -> bool:
        """Is this host the active writer of ``fqrn``? As the last look at the management API says; with no
        management API (one host) every repository it consumes counts."""
        if self.looker is None:
            return True
        return short_name(fqrn) in self.placement.get("active", ())

    def _idle(self, short: str) -> bool:
        fqrn = self.subscriptions.repositories.get(short)
        return (self.scheduler.waiting(fqrn) == 0 and not self.scheduler.owes_full(fqrn)
                and all(batch.lane != fqrn for batch in self.scheduler.running))

    # -- messages (I/O thread) ------------------------------------------------------------------------------

    def _on_sync_message(self, fqrn: str, delivery: amqp.Delivery):
        self.metrics.received.labels(REPOSITORY).inc()
        problems = []
        try:
            events = parse_s3_event(delivery.body, problems)
            touches = touched_keys(events, bucket=delivery.queue, prefix=self.config["repositories.prefix"],
                                   known_buckets=set(self.subscriptions.repositories))
            if problems and not events:
                raise MessageError("; ".join(problems))
        except MessageError as exc:
            self.failures.malformed(delivery, REPOSITORY, str(exc), repository=fqrn)
            return
        except Exception as exc:  # noqa: BLE001 -- no input may crash the daemon
            self.failures.malformed(delivery, REPOSITORY, "unexpected error reading the event: %s"
                                    % type(exc).__name__, repository=fqrn)
            log.exception("unexpected error reading an event")
            return
        for reason in problems + list(touches.ignored):
            self.metrics.ignored.inc()
            log.info("event record ignored: %s", reason, extra=fields(event="ignored", repository=fqrn))
        for key, reason in touches.refused:
            self.refusals.refused(fqrn, key, reason, "key")
        if not touches.keys:
            if self.broker.ack(delivery):
                self.metrics.acked.labels(REPOSITORY).inc()
            return
        self.scheduler.add(fqrn, self._pending(delivery, CHANGES, keys=touches.keys))

    def _pending(self, delivery, kind, **what) -> Pending:
        return Pending(ref=delivery, kind=kind, attempts=amqp.attempts_of(delivery.properties),
                       not_before=amqp.not_before_of(delivery.properties), received=self.clock(), **what)

    # -- runs -----------------------------------------------------------------------------------------------

    def _start_ready(self):
        if self.stopping:
            return
        for batch in self.scheduler.take_ready(self.clock()):
            self.metrics.runs_in_progress.inc()
            self.metrics.batch_size.labels(batch.mode).observe(batch.size)
            if batch.mode == PROVISION and not reapplied(batch):   # a re-apply never holds a queue back
                self.status.provisioning(batch.lane, "started")
            log.info("run started: %s %s", batch.mode, batch.lane,
                     extra=fields(event="run_started", repository=batch.lane, mode=batch.mode,
                                  messages=len(batch.messages), keys=len(batch.keys),
                                  waited=batch.waited(self.clock())))
            self.workers.start(batch)

    def _settle_finished(self, timeout: float = 0.0):
        for batch, result in self.workers.finished(timeout):
            self.metrics.runs_in_progress.dec()
            try:
                self._settle(batch, result)
            except amqp.CONNECTION_ERRORS:
                raise
            except Exception:  # noqa: BLE001 -- a bug here must not stop the daemon; the broker redelivers
                log.exception("could not settle the %s run of %s", batch.mode, batch.lane,
                              extra=fields(event="settle_failed", repository=batch.lane))

    def _settle(self, batch: Batch, result: RunResult):
        now = self.clock()
        self.scheduler.finished(batch, result.ok, now)
        self.metrics.runs.labels(result.playbook, result.outcome).inc()
        self.metrics.run_duration.labels(result.playbook).observe(result.duration)
        label = PUBLISHER if batch.mode == PROVISION else REPOSITORY
        log_fields = dict(repository=batch.lane, mode=batch.mode, outcome=result.outcome, messages=len(batch.messages),
                          keys=len(batch.keys), duration=round(result.duration, 3))
        if result.ok:
            log.info("run succeeded: %s %s", batch.mode, batch.lane, extra=fields(event="run_succeeded", **log_fields))
            if batch.mode == PROVISION:
                self.provisioning.succeeded(batch, result)
                self.status.provisioned(batch.lane)
                if self.broker.is_open and included(batch.lane, self.config["repositories.include"]):
                    self.subscriptions.subscribe(batch.lane)
            else:
                self._acknowledge(batch, label)
                self.status.published(batch.lane, batch.mode, len(batch.keys))
                self.metrics.last_publish.labels(batch.lane).set(now)
                self.refusals.record(batch.lane, result.refusals)
                if batch.mode == FULL:
                    self.failures.after_full_sync(batch.lane)
        elif self.workers.cancel and result.outcome == "canceled":
            log.warning("run interrupted by the shutdown: %s %s; its messages go back to the queue", batch.mode,
                        batch.lane, extra=fields(event="run_interrupted", **log_fields))
            for message in self.registry.drop_waiting(batch.messages):
                self.broker.requeue(message.ref)
        else:
            log.error("run failed: %s %s: %s", batch.mode, batch.lane, result.error,
                      extra=fields(event="run_failed", error=result.error, kept=result.kept, **log_fields))
            self.status.failed(batch.lane, result.error)
            if batch.mode == PROVISION:
                if not reapplied(batch):
                    self.status.provisioning(batch.lane, "failed")
                self.failures.after_failed_provision(batch, result.error, label, now)
            else:
                self.failures.after_failure(batch, result.error, label, now)
        self._save_status()

    def _acknowledge(self, batch: Batch, label: str):
        for message in batch.messages:
            if self.broker.ack(message.ref):
                self.metrics.acked.labels(label).inc()

    # -- what operators look at ----------------------------------------------------------------------------

    def _probe_depths(self):
        if not self.depths.due():
            return
        publisher, dead_letter = self.config["queues.publisher"], self.config["queues.dead_letter"]
        repositories = self.subscriptions.repositories
        depths = self.depths.probe(self.broker, [publisher, dead_letter] + sorted(repositories))
        self.metrics.provisioning_messages.set(depths.get(publisher) or 0)
        self.metrics.dead_letter_messages.set(depths.get(dead_letter) or 0)
        held = {batch.lane: len(batch.messages) for batch in self.scheduler.running}
        for short, fqrn in repositories.items():
            self.metrics.queue_messages.labels(fqrn).set(depths.get(short) or 0)
            self.metrics.pending_messages.labels(fqrn).set(self.scheduler.waiting(fqrn) + held.get(fqrn, 0))
        self._save_status()

    def status_page(self) -> bytes:
        """The page at ``/`` (HTTP thread): rendered from the status file, never from live daemon state."""
        return render_status_page(read_status(self.config["state_dir"]), self.clock())

    def _save_status(self):
        by_queue = self.subscriptions.repositories
        try:
            self.status.save(connected=self.broker.is_open, consuming=sorted(by_queue.values()),
                             missing_queues=sorted(self.subscriptions.missing_queues),
                             runs_in_progress=self.workers.in_flight,
                             host=self.host_id, queue_depths=self.depths.depths,
                             queues={"publisher": self.config["queues.publisher"],
                                     "dead_letter": self.config["queues.dead_letter"]},
                             active=[by_queue.get(q, q) for q in self.placement.get("active", [])],
                             standby=[by_queue.get(q, q) for q in self.placement.get("standby", [])],
                             hosts=self.placement.get("hosts", {}))
        except OSError as exc:
            log.warning("cannot write the status file: %s", exc.strerror, extra=fields(event="status_failed"))
