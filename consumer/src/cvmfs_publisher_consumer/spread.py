"""Spreading the repositories over the publisher hosts: one active writer each, every host within ±1 of even.

Every host consumes every repository queue. The queues have single-active-consumer, so the broker keeps exactly one
consumer of each queue active and, when that host dies or is cut off, activates a waiting one at once: failover
needs nothing from this module. But RabbitMQ 3.10 picks the active consumer by arrival (it ignores consumer
priorities), so left alone the first host to start would be active for everything.

This module is the small policy on top. Every ``cluster.spread_interval`` seconds a host reads from the management
API who is active for what (every consumer is tagged with its host id, see ``amqp.consumer_tag``) and gives up the
positions it holds above its fair share: it leaves the queue, the broker activates the next waiting host, and this
host subscribes again at the back of the line, as a standby. A position is given up only while its repository is
idle here (no run, nothing waiting), so a move never splits a batch.

Fair share: with R repositories and N live hosts, R mod N hosts hold ⌈R/N⌉ and the others ⌊R/N⌋; the larger
shares go to the hosts that hold the most now (ties broken by host id), so a balanced spread moves nothing, and
every host computes the same shares from the same view, so each gives up only its own surplus. The broker refreshes
the view every ``collect_statistics_interval`` (5 s by default); a stale view shows a newly activated consumer late,
so it delays a move rather than causing one too many, and the next look corrects it.
"""
import base64
import json
import ssl
import time
import urllib.parse
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set

from .amqp import host_of_tag

API_TIMEOUT = 3.0   # seconds per management API call (the call runs on the I/O thread)


@dataclass
class View:
    """Who consumes which queue: ``active[queue]`` is the active host (absent: none seen), ``standby[queue]`` the
    hosts waiting on it."""
    active: Dict[str, str] = field(default_factory=dict)
    standby: Dict[str, Set[str]] = field(default_factory=dict)

    @classmethod
    def from_consumers(cls, consumers: Iterable[Dict]) -> "View":
        """From the management API's ``/api/consumers/<vhost>`` list; consumers of other clients are ignored."""
        view = cls()
        for consumer in consumers:
            host = host_of_tag(consumer.get("consumer_tag"))
            queue = (consumer.get("queue") or {}).get("name")
            if not host or not queue:
                continue
            if consumer.get("active", True) and consumer.get("activity_status") != "waiting":
                view.active[queue] = host
            else:
                view.standby.setdefault(queue, set()).add(host)
        return view

    def hosts(self, queues: Iterable[str]) -> Set[str]:
        """The live publisher hosts: those consuming any of ``queues``."""
        found = set()
        for queue in queues:
            if queue in self.active:
                found.add(self.active[queue])
            found |= self.standby.get(queue, set())
        return found

    def counts(self, queues: Iterable[str]) -> Dict[str, int]:
        """Active positions per live host among ``queues`` (0 for a host that only waits)."""
        queues = list(queues)
        counts = {host: 0 for host in self.hosts(queues)}
        for queue in queues:
            if queue in self.active:
                counts[self.active[queue]] += 1
        return counts


def fair_shares(counts: Dict[str, int], total: int) -> Dict[str, int]:
    """Each host's share of ``total`` positions: ⌈total/N⌉ for the ``total mod N`` hosts holding the most now
    (ties: host id), ⌊total/N⌋ for the others."""
    if not counts:
        return {}
    base, extra = divmod(total, len(counts))
    ranked = sorted(counts, key=lambda host: (-counts[host], host))
    return {host: base + (1 if rank < extra else 0) for rank, host in enumerate(ranked)}


def to_give_up(view: View, me: str, queues: Sequence[str], idle: Callable[[str], bool]) -> List[str]:
    """The queues (among ``queues``, the repositories this host consumes) whose active position this host gives up
    now: as many as it holds above its fair share, only idle ones, only where another host waits to take over."""
    counts = view.counts(queues)
    if me not in counts:
        return []
    surplus = counts[me] - fair_shares(counts, len(queues))[me]
    if surplus <= 0:
        return []
    candidates = [q for q in sorted(queues) if view.active.get(q) == me and view.standby.get(q, set()) - {me}
                  and idle(q)]
    return candidates[:surplus]


def summary(view: View, me: str, queues: Sequence[str]) -> Dict:
    """For the status file and metrics: this host's active and standby queues, every live host's active count."""
    return {"active": sorted(q for q in queues if view.active.get(q) == me),
            "standby": sorted(q for q in queues if me in view.standby.get(q, set())),
            "hosts": view.counts(queues)}


class ManagementApi:
    """The RabbitMQ management HTTP API, read-only: the consumers of one vhost, from the first URL that answers."""

    def __init__(self, urls: Sequence[str], vhost: str, user: str, password: str, ca_cert: str = ""):
        self.urls = [url.rstrip("/") for url in urls]
        self.vhost = vhost
        token = base64.b64encode(("%s:%s" % (user, password)).encode()).decode()
        self._headers = {"Authorization": "Basic " + token, "Accept": "application/json"}
        self._context = ssl.create_default_context(cafile=ca_cert or None)

    def consumers(self) -> List[Dict]:
        error: Optional[Exception] = None
        path = "/api/consumers/" + urllib.parse.quote(self.vhost, safe="")
        for url in self.urls:
            request = urllib.request.Request(url + path, headers=self._headers)
            try:
                context = self._context if url.startswith("https:") else None
                with urllib.request.urlopen(request, timeout=API_TIMEOUT, context=context) as response:
                    return json.load(response)
            except (OSError, ValueError) as exc:   # URLError and HTTPError are OSErrors
                error = exc
        raise error or OSError("no management URL configured")

    def view(self) -> View:
        return View.from_consumers(self.consumers())


class Looker:
    """Reads the view through ``management`` (a ManagementApi) every ``interval`` seconds, in a thread of its own:
    the I/O thread polls it and goes on servicing the connection (heartbeats) while the API answers."""

    def __init__(self, management: ManagementApi, interval: float):
        self.management = management
        self.interval = interval
        self._next = 0.0
        self._looking: Optional[Future] = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="spread")

    def later(self):
        """The next look in a full ``interval`` (after a connect: the consumers need time to show)."""
        self._next = time.monotonic() + self.interval

    def poll(self) -> Optional[View]:
        """The view a look brought since the last call, else None (a look is started when one is due).
        Raises the look's OSError (management API unreachable)."""
        if self._looking is None:
            if time.monotonic() >= self._next:
                self._looking = self._thread.submit(self.management.view)
            return None
        if not self._looking.done():
            return None
        looked, self._looking = self._looking, None
        self.later()
        return looked.result()

    def close(self):
        self._thread.shutdown(wait=False)
