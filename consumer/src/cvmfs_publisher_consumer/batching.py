"""Which run comes next: per-repository coalescing, one run per repository at a time, N at once, retries.

Pure: no AMQP, no ansible-runner, no clock of its own (callers pass ``now``), so every decision is unit-tested.

A *lane* is one repository. Messages wait in their lane until the lane is idle, its retry time has come and a
run slot is free; then all waiting sync messages become one ``changes`` run over their distinct keys, or one
``full`` run when they are so many that listing the bucket is cheaper (provisioning requests for the lane go
first, identical requests share one run). The messages of a run are settled together when it ends: acked on
success, retried or dead-lettered on failure.

After a failed run the whole lane backs off (``backoff(consecutive failures)`` seconds), whatever new events
arrive meanwhile; other lanes are not delayed. A lane gets a ``full`` run every ``full_interval`` seconds (the
first one at a random point of the first interval, so repositories do not all reconcile at once), and as soon as
its backoff allows after some of its messages were dead-lettered, until one such run succeeds.
"""
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

PROVISION = "provision"
CHANGES = "changes"
FULL = "full"


@dataclass
class Pending:
    """One unacked message. ``ref`` is the AMQP layer's handle; the rest is what scheduling needs."""
    ref: Any
    kind: str                       # PROVISION or CHANGES
    keys: Tuple[str, ...] = ()      # touched object keys (sync)
    request: Any = None             # the ProvisionRequest (provisioning)
    attempts: int = 0               # failed runs so far, carried in the message's header
    not_before: float = 0.0         # no run before this time (retry backoff), carried in a header
    received: Optional[float] = None  # when the daemon got it (its clock): how long it waited for its run


@dataclass
class Batch:
    lane: str                       # the repository's fqrn
    mode: str                       # PROVISION, CHANGES or FULL
    messages: List[Pending]
    keys: List[str] = field(default_factory=list)
    request: Any = None

    @property
    def size(self) -> int:
        return len(self.keys) if self.keys else len(self.messages)

    def waited(self, now: float) -> Optional[float]:
        """Seconds the oldest of its messages has waited in the daemon (None: a scheduled run, no message)."""
        received = [message.received for message in self.messages if message.received is not None]
        return round(max(0.0, now - min(received)), 3) if received else None


@dataclass
class _Lane:
    pending: List[Pending] = field(default_factory=list)
    running: Optional[Batch] = None
    last_full: float = 0.0
    reconcile: bool = False         # a periodic full sync is configured for this lane
    failures: int = 0               # consecutive failed runs
    not_before: float = 0.0         # the lane's backoff after a failed run
    needs_full: bool = False        # messages were dead-lettered: a full sync brings the repository back


class Scheduler:
    def __init__(self, max_parallel: int, full_interval: float = 0.0, full_threshold: int = 0,
                 backoff: Callable[[int], float] = lambda failures: 0.0, rng: random.Random = None,
                 active: Callable[[str], bool] = lambda lane: True):
        self.max_parallel = max_parallel
        # Whether this host is the repository's active writer: a full sync nobody asked for (periodic, or after
        # dead letters) runs only there; with several hosts, the others would only repeat it.
        self.active = active
        self.full_interval = full_interval
        # From this many distinct keys on, one listing of the bucket (full) is cheaper than a look at each key.
        self.full_threshold = full_threshold
        self.backoff = backoff
        self._rng = rng or random.Random()
        self._lanes: Dict[str, _Lane] = {}

    def _lane(self, name) -> _Lane:
        return self._lanes.setdefault(name, _Lane())

    def track(self, lane: str, now: float):
        """A repository this daemon consumes: its periodic full sync (if configured) counts from now."""
        state = self._lane(lane)
        if not state.reconcile:
            state.reconcile, state.last_full = True, now - self._rng.random() * self.full_interval

    def reconcile_soon(self, lane: str):
        """Some of the lane's messages were dead-lettered: a full sync as soon as the lane may run."""
        self._lane(lane).needs_full = True

    def owes_full(self, lane: str) -> bool:
        """A full sync is owed after dead letters (this host keeps its active position until it ran)."""
        state = self._lanes.get(lane)
        return bool(state and state.needs_full)

    def add(self, lane: str, message: Pending):
        self._lane(lane).pending.append(message)

    @property
    def running(self) -> List[Batch]:
        return [lane.running for lane in self._lanes.values() if lane.running]

    def waiting(self, lane: str) -> int:
        state = self._lanes.get(lane)
        return len(state.pending) if state else 0

    def take_ready(self, now: float) -> List[Batch]:
        """Start what may start now; the returned batches are marked running until ``finished``."""
        started = []
        free = self.max_parallel - len(self.running)
        # Lanes whose oldest message has waited longest go first, so a busy repository cannot starve others.
        candidates = sorted(self._lanes.items(), key=lambda item: self._oldest(item[1]))
        for name, state in candidates:
            if free <= 0:
                break
            if state.running:
                continue
            batch = self._next_batch(name, state, now)
            if batch:
                state.running = batch
                started.append(batch)
                free -= 1
        return started

    @staticmethod
    def _oldest(state: _Lane) -> float:
        return min((m.not_before for m in state.pending), default=float("inf"))

    def _full_due(self, state: _Lane, now: float) -> bool:
        return self.full_interval > 0 and state.reconcile and now - state.last_full >= self.full_interval

    def _next_batch(self, name: str, state: _Lane, now: float) -> Optional[Batch]:
        if state.not_before > now or any(m.not_before > now for m in state.pending):
            return None
        provisions = [m for m in state.pending if m.kind == PROVISION]
        if provisions:
            first = provisions[0].request
            same = [m for m in provisions if m.request == first]
            self._remove(state, same)
            return Batch(name, PROVISION, same, request=first)
        syncs = [m for m in state.pending if m.kind == CHANGES]
        if (state.needs_full or self._full_due(state, now)) and (syncs or self.active(name)):
            # A full sync also covers every waiting event.
            self._remove(state, syncs)
            return Batch(name, FULL, syncs)
        if syncs:
            self._remove(state, syncs)
            keys = sorted({key for m in syncs for key in m.keys})
            if self.full_threshold and len(keys) >= self.full_threshold:
                return Batch(name, FULL, syncs, keys=keys)
            return Batch(name, CHANGES, syncs, keys=keys)
        return None

    @staticmethod
    def _remove(state: _Lane, messages):
        taken = {id(m) for m in messages}
        state.pending = [m for m in state.pending if id(m) not in taken]

    def finished(self, batch: Batch, succeeded: bool, now: float):
        state = self._lane(batch.lane)
        state.running = None
        if not succeeded:
            state.failures += 1
            state.not_before = now + self.backoff(state.failures)
            return
        state.failures, state.not_before = 0, 0.0
        if batch.mode == FULL:
            state.last_full, state.needs_full = now, False

    def drain(self) -> List[Pending]:
        """Every waiting (not running) message, removed: for a shutdown or a lost connection."""
        messages = []
        for state in self._lanes.values():
            messages.extend(state.pending)
            state.pending = []
        return messages


@dataclass(frozen=True)
class Decision:
    action: str                     # "retry" or "dead-letter"
    attempts: int
    not_before: float = 0.0


class RetryPolicy:
    """Capped exponential backoff with jitter; dead-letter once a message has failed ``max_attempts`` runs."""

    def __init__(self, max_attempts: int, initial_delay: float, max_delay: float, rng: random.Random = None):
        self.max_attempts = max_attempts
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self._rng = rng or random.Random()

    def delay(self, attempts: int) -> float:
        """Seconds before attempt ``attempts + 1``: between half and all of the capped exponential step."""
        step = min(self.max_delay, self.initial_delay * (2 ** max(0, attempts - 1)))
        return step * (0.5 + 0.5 * self._rng.random())

    def after_failure(self, message: Pending, now: float) -> Decision:
        attempts = message.attempts + 1
        if attempts >= self.max_attempts:
            return Decision("dead-letter", attempts)
        return Decision("retry", attempts, now + self.delay(attempts))


def reconnect_delays(initial: float, maximum: float, rng: random.Random = None):
    """Endless delays for reconnecting: capped exponential with jitter (the caller resets it once connected)."""
    rng = rng or random.Random()
    step = initial
    while True:
        yield step * (0.5 + 0.5 * rng.random())
        step = min(maximum, step * 2)
