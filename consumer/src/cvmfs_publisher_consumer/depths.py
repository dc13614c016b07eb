"""Queue depths the daemon probes every few seconds, for the metrics, the status file and the status page.

A passive declare per queue on the daemon's own connection (the I/O thread; about a millisecond each), so nothing
but the daemon's broker user is needed: no management API. A probe that fails leaves the depths unknown (None).
``queue_depths`` does the same once, on a connection of its own, for ``cvmfs-publisher status``.
"""
import time
from typing import Dict, Iterable, Optional

import pika.exceptions

from . import amqp
from .amqp import CONNECTION_ERRORS
from .config import read_secret

PROBE_INTERVAL = 15.0


class DepthProbe:
    def __init__(self, interval: float = PROBE_INTERVAL, clock=time.monotonic):
        self.interval = interval
        self._clock = clock
        self._next = 0.0
        self.depths: Dict[str, Optional[int]] = {}

    def due(self) -> bool:
        return self._clock() >= self._next

    def probe(self, broker, queues: Iterable[str]) -> Dict[str, Optional[int]]:
        """Ready messages per queue (None: missing or unknown). Connection errors propagate (the daemon
        reconnects); a channel error on one queue makes only that one unknown."""
        self._next = self._clock() + self.interval
        depths = {}
        for name in dict.fromkeys(queues):
            try:
                depths[name] = broker.queue_exists(name)
            except CONNECTION_ERRORS:
                raise
            except pika.exceptions.AMQPChannelError:
                depths[name] = None
        self.depths = depths
        return depths


def queue_depths(config, queues) -> Dict[str, Optional[int]]:
    """Ready messages per queue, by passive declares over AMQP on a connection of its own (for ``status``)."""
    broker = amqp.Broker(amqp.connection_parameters(config.section("amqp"), read_secret(config["amqp.password_file"])),
                         config["queues.dead_letter"])
    broker.connect(declare_dead_letter=False)
    try:
        return {name: broker.queue_exists(name) for name in queues}
    finally:
        broker.close()
