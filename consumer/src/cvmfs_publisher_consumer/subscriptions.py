"""Which repository queues this host consumes: the repositories provisioned here (repositories.py), each subscribed
to its queue (the repository's short name), missing queues looked for again at every rescan, a warning when a queue
lacks single-active-consumer, and an active position given up (spread.py) by subscribing again as a standby.

Used only from the daemon's I/O thread, like the broker it drives.
"""
import logging
import time
from typing import Callable, Dict, List, Set

import pika.exceptions

from .logs import fields
from .messages import short_name
from .repositories import discover_repositories

log = logging.getLogger("cvmfs_publisher")


class Subscriptions:
    """The repositories this host knows (``repositories``: short name -> fqrn) and their queues' consumers.

    ``on_message(fqrn)`` gives the delivery callback of a repository's queue; ``on_subscribe(fqrn, first)`` is
    called on every subscribe, ``first`` when the repository was not known yet; ``held_back(fqrn)`` is true for a
    repository whose queue must wait (its provisioning has not succeeded yet), unless it is consumed already."""

    def __init__(self, broker, config, on_message: Callable, on_subscribe: Callable,
                 held_back: Callable[[str], bool] = lambda fqrn: False, clock=time.monotonic):
        self.broker = broker
        self.config_dir = config["repositories.config_dir"]
        self.include = config["repositories.include"]
        self.rescan_interval = config["repositories.rescan_interval"]
        self.prefetch = config["queues.sync_prefetch"]
        self._on_message = on_message
        self._on_subscribe = on_subscribe
        self._held_back = held_back
        self._clock = clock
        self.repositories: Dict[str, str] = {}   # short name (queue, bucket) -> fqrn
        self.missing_queues: Set[str] = set()
        self._sac_checked: Set[str] = set()
        self._next_rescan = 0.0

    def rescan_now(self):
        """The next ``rescan`` looks at once (after a reconnect)."""
        self._next_rescan = 0.0

    def rescan(self) -> bool:
        """Every ``repositories.rescan_interval``: pick up repositories provisioned on this host (also by hand) and
        queues that were missing. False when it was not time to look yet."""
        now = self._clock()
        if now < self._next_rescan:
            return False
        self._next_rescan = now + self.rescan_interval if self.rescan_interval else float("inf")
        for short, fqrn in discover_repositories(self.config_dir, self.include).items():
            if self._held_back(fqrn) and not self.broker.consuming(short):
                continue  # half-provisioned: its queue waits until a provisioning run succeeds
            self.subscribe(fqrn)
        return True

    def consumed(self) -> List[str]:
        """The queues (short names) this host consumes now, active or standby."""
        return [short for short in self.repositories if self.broker.consuming(short)]

    def subscribe(self, fqrn: str):
        short = short_name(fqrn)
        first = short not in self.repositories
        self.repositories[short] = fqrn
        self._on_subscribe(fqrn, first)
        if self.broker.consuming(short):
            return
        try:
            consuming = self.broker.consume(short, self.prefetch, self._on_message(fqrn))
        except pika.exceptions.AMQPChannelError as exc:  # e.g. 403: this user may not read that queue
            log.error("cannot consume queue %s of repository %s: %s", short, fqrn, exc,
                      extra=fields(event="consume_failed", repository=fqrn, queue=short))
            consuming = False
        if not consuming:
            if short not in self.missing_queues:
                log.warning("queue %s of repository %s does not exist; will look again", short, fqrn,
                            extra=fields(event="queue_missing", repository=fqrn, queue=short))
            self.missing_queues.add(short)
            return
        self.missing_queues.discard(short)
        log.info("consuming %s", short, extra=fields(event="consuming", repository=fqrn, queue=short))
        self._check_single_active_consumer(short, fqrn)

    def give_up(self, short: str):
        """Leave the active position on ``short``: the broker activates the next waiting host, and this host
        subscribes again, at the back of the line (a standby)."""
        fqrn = self.repositories[short]
        log.info("giving up the active position on %s (above this host's fair share)", short,
                 extra=fields(event="gave_up", repository=fqrn, queue=short))
        self.broker.release(short)
        self.subscribe(fqrn)

    def _check_single_active_consumer(self, short: str, fqrn: str):
        if short in self._sac_checked:
            return
        self._sac_checked.add(short)
        problem = self.broker.single_active_consumer_problem(short)
        if problem:
            log.warning("queue %s has no single-active-consumer: two daemons could run two syncs of %s at "
                        "once (%s)", short, fqrn, problem,
                        extra=fields(event="no_single_active_consumer", repository=fqrn, queue=short))
