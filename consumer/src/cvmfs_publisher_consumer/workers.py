"""The worker threads: ``sync.max_parallel`` of them, each running one batch's playbook (contract.py says which, with
which extravars) and handing the result back to the daemon's I/O thread, which alone settles it.

A finished run wakes the I/O loop (``wake``) so it is settled at once; nothing here touches the broker otherwise.
"""
import logging
import queue
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Tuple

from . import contract
from .batching import Batch
from .messages import short_name
from .runner import PlaybookRunner, RunResult

log = logging.getLogger("cvmfs_publisher")


class Workers:
    def __init__(self, runner: PlaybookRunner, size: int, wake: Callable[[], None]):
        self.runner = runner
        self.in_flight = 0          # started and not yet handed back through ``finished`` (I/O thread only)
        self.cancel = False         # set at shutdown: running playbooks are cancelled
        self._wake = wake
        self._pool = ThreadPoolExecutor(size, thread_name_prefix="run")
        self._results: "queue.Queue[Tuple[Batch, RunResult]]" = queue.Queue()

    def start(self, batch: Batch):
        self.in_flight += 1
        self._pool.submit(self._execute, batch)

    def _execute(self, batch: Batch):
        """Worker thread: run the playbook, hand the result to the I/O thread."""
        playbook, extravars = contract.for_batch(batch)
        label = "%s-%s" % (batch.mode, short_name(batch.lane))
        try:
            result = self.runner.run(playbook, extravars, label, cancel=lambda: self.cancel)
        except Exception as exc:  # noqa: BLE001 -- a worker must always report back
            log.exception("run crashed")
            result = RunResult(playbook=playbook, outcome="error", rc=None, duration=0.0,
                               error="run crashed: %s" % type(exc).__name__)
        self._results.put((batch, result))
        self._wake()

    def finished(self, timeout: float = 0.0) -> Iterator[Tuple[Batch, RunResult]]:
        """The runs that finished (waiting up to ``timeout`` seconds for the first one), each counted out of
        ``in_flight`` as it is handed over."""
        while True:
            try:
                batch, result = self._results.get(timeout=timeout) if timeout else self._results.get_nowait()
            except queue.Empty:
                return
            timeout = 0.0
            self.in_flight -= 1
            yield batch, result

    def shutdown(self):
        """Wait for the threads (call once ``in_flight`` is 0)."""
        self._pool.shutdown(wait=True)
