"""The daemon: queues in, ansible-runner runs out, every message settled only when its work is done.

Threads: the main thread is the I/O thread (pika BlockingConnection, the scheduler, acks, the status file);
a pool of ``sync.max_parallel`` workers runs playbooks and hands results back through ``self._results``.
Nothing but the I/O thread touches the broker or the scheduler, so neither needs a lock.
"""
import logging
import os
import queue
import signal
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Dict, Optional, Set

import pika.exceptions

from . import amqp, contract, guard, spread
from .batching import CHANGES, FULL, PROVISION, Batch, Pending, RetryPolicy, Scheduler, reconnect_delays
from .config import Config, read_secret
from .depths import DepthProbe
from .failures import Failures
from .logs import fields
from .messages import MessageError, parse_provision, parse_s3_event, short_name, touched_keys
from .metrics import Metrics
from .registry import Registry, RegistryRef
from .repositories import discover_repositories, included
from .runner import PlaybookRunner, RunResult, secret_values
from .status import StatusFile, read_status
from .statuspage import render as render_status_page

log = logging.getLogger("cvmfs_publisher")

LOOP_SECONDS = 0.1        # longest wait before a finished run is settled (the workers also wake the loop)
REGISTRY_PREFETCH = 100   # registry entries in flight while replaying the stream
PUBLISHER = "publisher"   # metrics label of the provisioning queue
REPOSITORY = "repository"


def known_secrets(config: Config):
    """Every secret the daemon can know of, to scrub from logs and kept runs: never logged themselves."""
    return [read_secret(config["amqp.password_file"])] + secret_values(config["ansible.extravars_files"])


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
        self.management = None
        if config["cluster.management_urls"] and config["cluster.spread_interval"]:
            self.management = spread.ManagementApi(config["cluster.management_urls"], config["amqp.vhost"],
                                                   config["amqp.user"], password, config["amqp.ca_cert"])
        self.placement: Dict = {}   # spread.summary of the last look: active, standby, hosts
        self._next_spread = 0.0
        self._view: Optional[Future] = None   # the management API is read off the I/O thread (heartbeats go on)
        self._viewer = ThreadPoolExecutor(1, thread_name_prefix="spread")
        self.runner = runner or PlaybookRunner(config.section("ansible"), state_dir, secrets=known_secrets(config))
        self.metrics = metrics or Metrics()
        self.status = StatusFile(state_dir, clock=clock)
        self.retry = RetryPolicy(config["sync.max_attempts"], config["sync.retry_initial_delay"],
                                 config["sync.retry_max_delay"])
        self.scheduler = Scheduler(config["sync.max_parallel"], config["sync.full_reconcile_interval"],
                                   config["sync.full_sync_threshold"], backoff=self.retry.delay)
        self.failures = Failures(self.broker, self.metrics, self.scheduler, self.retry)
        self.repositories: Dict[str, str] = {}   # short name (queue, bucket) -> fqrn
        self._missing_queues: Set[str] = set()
        self._sac_checked: Set[str] = set()
        self._pool = ThreadPoolExecutor(config["sync.max_parallel"], thread_name_prefix="run")
        self._results: "queue.Queue" = queue.Queue()
        self._in_flight = 0
        self._next_rescan = 0.0
        self.depths = DepthProbe()
        self.stopping = False
        self._cancel_runs = False

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
        self._log_isolation()
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

    @staticmethod
    def _log_isolation():
        isolation = guard.isolation_available()
        if isolation == guard.PID_NAMESPACE:
            log.info("each run gets a PID namespace: no process of a run outlives the daemon",
                     extra=fields(event="run_isolation", isolation=isolation))
        else:
            log.warning("no PID namespace for runs (needs CAP_SYS_ADMIN): a run's orphans are killed when it ends or "
                        "the daemon dies, but not if its guard process is killed itself",
                        extra=fields(event="run_isolation", isolation=isolation))

    def _connect(self):
        self.broker.connect()
        self.metrics.set_connected(True)
        log.info("connected to RabbitMQ", extra=fields(event="connected", host=self.config["amqp.host"],
                                                       port=self.config["amqp.port"]))
        problem = self.broker.ensure_queue(self.config["queues.publisher"])
        if problem:
            log.warning("provisioning queue exists with other arguments: %s", problem,
                        extra=fields(event="queue_arguments", queue=self.config["queues.publisher"]))
        self.broker.consume(self.config["queues.publisher"], self.config["queues.publisher_prefetch"],
                            self._on_provision_message)
        registry = self.config["queues.registry"]
        problem = self.broker.ensure_stream(registry)
        if problem:
            log.error("the registry %s is not a stream: %s", registry, problem,
                      extra=fields(event="registry_unusable", queue=registry))
        else:
            # Read from the first entry on every connection: whatever this host missed is applied now.
            self.broker.consume(registry, REGISTRY_PREFETCH, self._on_registry_entry,
                                arguments={"x-stream-offset": "first"})
        self._next_rescan = 0.0
        self._next_spread = time.monotonic() + self.config["cluster.spread_interval"]
        self._rescan()
        self.failures.find_left(self.repositories)
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
        self._drop_registry_entries(self.scheduler.drain())
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

    def _shutdown(self):
        """Stop consuming, let running runs finish for ``shutdown_grace`` seconds, then cancel them; every
        message not acked by then goes back to its queue."""
        try:
            if self.broker.is_open:
                self.broker.stop_consuming()
                for message in self._drop_registry_entries(self.scheduler.drain()):
                    self.broker.requeue(message.ref)
        except amqp.CONNECTION_ERRORS as exc:
            self._disconnected(exc)
        deadline = time.monotonic() + self.config["shutdown_grace"]
        while self._in_flight and time.monotonic() < deadline:
            self._pump()
        if self._in_flight:
            log.warning("cancelling %d run(s) still going after %.0fs", self._in_flight,
                        self.config["shutdown_grace"], extra=fields(event="cancel_runs"))
            self._cancel_runs = True
            while self._in_flight:
                self._pump()
        self._pool.shutdown(wait=True)
        self._viewer.shutdown(wait=False)
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
        """Pick up repositories provisioned on this host (also by hand) and queues that were missing."""
        now = time.monotonic()
        if now < self._next_rescan:
            return
        interval = self.config["repositories.rescan_interval"]
        self._next_rescan = now + interval if interval else float("inf")
        found = discover_repositories(self.config["repositories.config_dir"], self.config["repositories.include"])
        for short, fqrn in found.items():
            if self.status.provisioning_unfinished(fqrn) and not self.broker.consuming(short):
                continue  # half-provisioned: its queue waits until a provisioning run succeeds
            self._subscribe(short, fqrn)
        self.metrics.repositories.set(sum(1 for short in self.repositories if self.broker.consuming(short)))

    def _spread(self):
        """Every ``cluster.spread_interval``: look at who is active for what (read in the background), then give up
        the positions above this host's fair share (spread.py)."""
        if self.management is None:
            return
        if self._view is None:
            if time.monotonic() >= self._next_spread:
                self._view = self._viewer.submit(self.management.view)
            return
        if not self._view.done():
            return
        looked, self._view = self._view, None
        self._next_spread = time.monotonic() + self.config["cluster.spread_interval"]
        try:
            view = looked.result()
        except OSError as exc:
            log.warning("cannot read who is active for what from the management API: %s", exc,
                        extra=fields(event="spread_view_failed", error_type=type(exc).__name__))
            return
        queues = [short for short in self.repositories if self.broker.consuming(short)]
        for short in spread.to_give_up(view, self.host_id, queues, self._idle):
            fqrn = self.repositories[short]
            log.info("giving up the active position on %s (above this host's fair share)", short,
                     extra=fields(event="gave_up", repository=fqrn, queue=short))
            self.broker.release(short)
            self.metrics.given_up.inc()
            self._subscribe(short, fqrn)   # again, at the back of the line: a standby
            view.active.pop(short, None)
            view.standby.setdefault(short, set()).add(self.host_id)
        self.placement = spread.summary(view, self.host_id, queues)
        self.metrics.set_placement(self.placement, self.repositories)
        for short in queues:   # the status page's "active on" column
            self.status.repository(self.repositories[short])["active_host"] = view.active.get(short, "")
        self._save_status()

    def _idle(self, short: str) -> bool:
        fqrn = self.repositories.get(short)
        return self.scheduler.waiting(fqrn) == 0 and all(batch.lane != fqrn for batch in self.scheduler.running)

    def _subscribe(self, short: str, fqrn: str):
        if short not in self.repositories:
            last = self.status.repository(fqrn).get("last_publish")
            if last:  # the metric survives a restart, so "behind" alerts compare against the real last publish
                self.metrics.last_publish.labels(fqrn).set(last)
        self.repositories[short] = fqrn
        self.scheduler.track(fqrn, self.clock())
        if self.broker.consuming(short):
            return
        try:
            consuming = self.broker.consume(short, self.config["queues.sync_prefetch"],
                                            partial(self._on_sync_message, fqrn))
        except pika.exceptions.AMQPChannelError as exc:  # e.g. 403: this user may not read that queue
            log.error("cannot consume queue %s of repository %s: %s", short, fqrn, exc,
                      extra=fields(event="consume_failed", repository=fqrn, queue=short))
            consuming = False
        if not consuming:
            if short not in self._missing_queues:
                log.warning("queue %s of repository %s does not exist; will look again", short, fqrn,
                            extra=fields(event="queue_missing", repository=fqrn, queue=short))
            self._missing_queues.add(short)
            return
        self._missing_queues.discard(short)
        log.info("consuming %s", short, extra=fields(event="consuming", repository=fqrn, queue=short))
        if short not in self._sac_checked:
            self._sac_checked.add(short)
            problem = self.broker.single_active_consumer_problem(short)
            if problem:
                log.warning("queue %s has no single-active-consumer: two daemons could run two syncs of %s at "
                            "once (%s)", short, fqrn, problem,
                            extra=fields(event="no_single_active_consumer", repository=fqrn, queue=short))

    # -- messages (I/O thread) ------------------------------------------------------------------------------

    def _on_provision_message(self, delivery: amqp.Delivery):
        self.metrics.received.labels(PUBLISHER).inc()
        try:
            request = parse_provision(delivery.body, self.config["repositories.domain"])
        except MessageError as exc:
            self._reject(delivery, PUBLISHER, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 -- no input may crash the daemon
            self._reject(delivery, PUBLISHER, "unexpected error reading the message: %s" % type(exc).__name__)
            log.exception("unexpected error reading a provisioning message")
            return
        log.info("provisioning request for %s", request.repository,
                 extra=fields(event="provision_request", repository=request.repository, form=request.form,
                              kind="personal" if request.subject else "group"))
        # Every host applies it: it goes to the registry, which every host reads (registry.py).
        if self.broker.forward(delivery, self.config["queues.registry"]):
            self.metrics.acked.labels(PUBLISHER).inc()
            log.info("provisioning request for %s added to the registry", request.repository,
                     extra=fields(event="provision_registered", repository=request.repository))

    def _on_registry_entry(self, delivery: amqp.Delivery):
        """An entry of the registry: provision it here unless that was done already."""
        self.broker.ack(delivery)   # a stream keeps its entries; the ack only lets the next ones come
        try:
            request = parse_provision(delivery.body, self.config["repositories.domain"])
        except MessageError as exc:  # checked before it was added: another domain, or added by hand
            log.warning("skipping registry entry: %s", exc, extra=fields(event="registry_entry_skipped"))
            return
        if not included(request.repository, self.config["repositories.include"]):
            return
        if not self.registry.wanted(request):
            return
        self.registry.queued(request)
        offset = amqp.header(delivery.properties, "x-stream-offset", 0)
        log.info("provisioning %s from the registry", request.repository,
                 extra=fields(event="registry_entry", repository=request.repository, offset=offset))
        self.scheduler.add(request.repository, Pending(ref=RegistryRef(offset), kind=PROVISION, request=request))

    def _drop_registry_entries(self, messages):
        """Forget waiting registry entries (the next replay queues them again); the AMQP messages remain."""
        kept = []
        for message in messages:
            if isinstance(message.ref, RegistryRef):
                self.registry.finished(message.request, succeeded=False)
            else:
                kept.append(message)
        return kept

    def _on_sync_message(self, fqrn: str, delivery: amqp.Delivery):
        self.metrics.received.labels(REPOSITORY).inc()
        problems = []
        try:
            events = parse_s3_event(delivery.body, problems)
            touches = touched_keys(events, bucket=delivery.queue, prefix=self.config["repositories.prefix"],
                                   known_buckets=set(self.repositories))
            if problems and not events:
                raise MessageError("; ".join(problems))
        except MessageError as exc:
            self._reject(delivery, REPOSITORY, str(exc), repository=fqrn)
            return
        except Exception as exc:  # noqa: BLE001 -- no input may crash the daemon
            self._reject(delivery, REPOSITORY, "unexpected error reading the event: %s" % type(exc).__name__,
                         repository=fqrn)
            log.exception("unexpected error reading an event")
            return
        for reason in problems + list(touches.ignored):
            self.metrics.ignored.inc()
            log.info("event record ignored: %s", reason, extra=fields(event="ignored", repository=fqrn))
        for key, reason in touches.refused:
            self.refused(fqrn, key, reason, "key")
        if not touches.keys:
            if self.broker.ack(delivery):
                self.metrics.acked.labels(REPOSITORY).inc()
            return
        self.scheduler.add(fqrn, self._pending(delivery, CHANGES, keys=touches.keys))

    def refused(self, fqrn: str, key: str, reason: str, category: str, etag: str = ""):
        """One object the publisher will not publish as it is: one log line, one count."""
        self.metrics.objects_refused.labels(fqrn, category).inc()
        log.warning("object refused: %s: %s", key, reason,
                    extra=fields(event="object_refused", repository=fqrn, key=key, reason=reason, category=category,
                                 etag=etag))

    def _record_refusals(self, fqrn: str, refusals: Optional[Dict]):
        """The sync run's refusals (from its result, read off the runner's events): a log line and a count per
        object refused for the first time, a line per refusal cleared, the current list into the status file."""
        if not isinstance(refusals, dict):
            return
        for item in refusals.get("new") or []:
            self.refused(fqrn, str(item.get("key", "")), str(item.get("reason", "")),
                         str(item.get("category") or "other"), str(item.get("etag") or ""))
        for key in refusals.get("cleared") or []:
            log.info("refusal cleared: %s", key, extra=fields(event="refusal_cleared", repository=fqrn, key=key))
        current = refusals.get("current") or []
        self.status.refusals(fqrn, current, refusals.get("count", len(current)))

    @staticmethod
    def _pending(delivery, kind, **what) -> Pending:
        return Pending(ref=delivery, kind=kind, attempts=amqp.attempts_of(delivery.properties),
                       not_before=amqp.not_before_of(delivery.properties), **what)

    def _reject(self, delivery: amqp.Delivery, label: str, reason: str, repository: str = ""):
        """A message that can never succeed: straight to the dead-letter queue."""
        log.warning("dead-lettering a message from %s: %s", delivery.queue, reason,
                    extra=fields(event="dead_letter", queue=delivery.queue, repository=repository, reason=reason,
                                 count=1, cause=amqp.MALFORMED))
        if self.broker.dead_letter(delivery, reason, amqp.attempts_of(delivery.properties), amqp.MALFORMED):
            self.metrics.dead_lettered.labels(label, "malformed").inc()

    # -- runs -----------------------------------------------------------------------------------------------

    def _start_ready(self):
        if self.stopping:
            return
        for batch in self.scheduler.take_ready(self.clock()):
            self._in_flight += 1
            self.metrics.runs_in_progress.inc()
            self.metrics.batch_size.labels(batch.mode).observe(batch.size)
            if batch.mode == PROVISION:
                self.status.provisioning(batch.lane, "started")
            log.info("run started: %s %s", batch.mode, batch.lane,
                     extra=fields(event="run_started", repository=batch.lane, mode=batch.mode,
                                  messages=len(batch.messages), keys=len(batch.keys)))
            self._pool.submit(self._execute, batch)

    def _execute(self, batch: Batch):
        """Worker thread: run the playbook, hand the result to the I/O thread."""
        playbook, extravars = contract.for_batch(batch)
        label = "%s-%s" % (batch.mode, short_name(batch.lane))
        try:
            result = self.runner.run(playbook, extravars, label, cancel=lambda: self._cancel_runs)
        except Exception as exc:  # noqa: BLE001 -- a worker must always report back
            log.exception("run crashed")
            result = RunResult(playbook=playbook, outcome="error", rc=None, duration=0.0,
                               error="run crashed: %s" % type(exc).__name__)
        self._results.put((batch, result))
        self.broker.wake(lambda: None)

    def _settle_finished(self, timeout: float = 0.0):
        while True:
            try:
                batch, result = self._results.get(timeout=timeout) if timeout else self._results.get_nowait()
            except queue.Empty:
                return
            timeout = 0.0
            self._in_flight -= 1
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
                self.registry.finished(batch.request, succeeded=True)
                self.status.provisioned(batch.lane)
                if self.broker.is_open and included(batch.lane, self.config["repositories.include"]):
                    self._subscribe(short_name(batch.lane), batch.lane)
            else:
                self._acknowledge(batch, label)
                self.status.published(batch.lane, batch.mode, len(batch.keys))
                self.metrics.last_publish.labels(batch.lane).set(now)
                self._record_refusals(batch.lane, result.refusals)
                if batch.mode == FULL:
                    self.failures.after_full_sync(batch.lane)
        elif self._cancel_runs and result.outcome == "canceled":
            log.warning("run interrupted by the shutdown: %s %s; its messages go back to the queue", batch.mode,
                        batch.lane, extra=fields(event="run_interrupted", **log_fields))
            for message in self._drop_registry_entries(batch.messages):
                self.broker.requeue(message.ref)
        else:
            log.error("run failed: %s %s: %s", batch.mode, batch.lane, result.error,
                      extra=fields(event="run_failed", error=result.error, kept=result.kept, **log_fields))
            self.status.failed(batch.lane, result.error)
            if batch.mode == PROVISION:
                self.status.provisioning(batch.lane, "failed")
                self._retry_provision(batch, result, now)
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
        depths = self.depths.probe(self.broker, [publisher, dead_letter] + sorted(self.repositories))
        self.metrics.provisioning_messages.set(depths.get(publisher) or 0)
        self.metrics.dead_letter_messages.set(depths.get(dead_letter) or 0)
        held = {batch.lane: len(batch.messages) for batch in self.scheduler.running}
        for short, fqrn in self.repositories.items():
            self.metrics.queue_messages.labels(fqrn).set(depths.get(short) or 0)
            self.metrics.pending_messages.labels(fqrn).set(self.scheduler.waiting(fqrn) + held.get(fqrn, 0))
        self._save_status()

    def status_page(self) -> bytes:
        """The page at ``/`` (HTTP thread): rendered from the status file, never from live daemon state."""
        return render_status_page(read_status(self.config["state_dir"]), self.clock())

    def _retry_provision(self, batch: Batch, result: RunResult, now: float):
        """A registry entry that failed here is retried here (the registry is shared: nothing goes back to it);
        after ``sync.max_attempts`` it waits for the next replay (next connection or daemon start)."""
        for message in batch.messages:
            decision = self.retry.after_failure(message, now)
            if decision.action == "retry":
                message.attempts, message.not_before = decision.attempts, decision.not_before
                self.scheduler.add(batch.lane, message)
                self.metrics.retried.labels(PUBLISHER).inc()
            else:
                self.registry.finished(message.request, succeeded=False)
                log.error("giving up provisioning %s after %d failed runs until the registry is read again: %s",
                          batch.lane, decision.attempts, result.error,
                          extra=fields(event="provision_given_up", repository=batch.lane, error=result.error))

    def _save_status(self):
        by_queue = self.repositories
        try:
            self.status.save(connected=self.broker.is_open, consuming=sorted(self.repositories.values()),
                             missing_queues=sorted(self._missing_queues), runs_in_progress=self._in_flight,
                             host=self.host_id, queue_depths=self.depths.depths,
                             queues={"publisher": self.config["queues.publisher"],
                                     "dead_letter": self.config["queues.dead_letter"]},
                             active=[by_queue.get(q, q) for q in self.placement.get("active", [])],
                             standby=[by_queue.get(q, q) for q in self.placement.get("standby", [])],
                             hosts=self.placement.get("hosts", {}))
        except OSError as exc:
            log.warning("cannot write the status file: %s", exc.strerror, extra=fields(event="status_failed"))


def queue_depths(config: Config, queues) -> Dict[str, Optional[int]]:
    """Ready messages per queue, by passive declares over AMQP (for ``status``)."""
    broker = amqp.Broker(amqp.connection_parameters(config.section("amqp"), read_secret(config["amqp.password_file"])),
                         config["queues.dead_letter"])
    broker.connect(declare_dead_letter=False)
    try:
        return {name: broker.queue_exists(name) for name in queues}
    finally:
        broker.close()
