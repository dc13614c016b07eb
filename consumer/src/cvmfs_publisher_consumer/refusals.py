"""Objects the publisher will not publish as they are: a key refused when its event is read, and the refusals a
sync run reports (its result, read off the runner's events; the sync side is plugins/module_utils/_refusals.py).
Each is one log line and one count when first seen; the current list goes into the status file."""
import logging
from typing import Dict, Optional

from .logs import fields
from .metrics import Metrics
from .status import StatusFile

log = logging.getLogger("cvmfs_publisher")


class Refusals:
    def __init__(self, metrics: Metrics, status: StatusFile):
        self.metrics = metrics
        self.status = status

    def refused(self, fqrn: str, key: str, reason: str, category: str, etag: str = ""):
        """One object the publisher will not publish as it is: one log line, one count."""
        self.metrics.objects_refused.labels(fqrn, category).inc()
        log.warning("object refused: %s: %s", key, reason,
                    extra=fields(event="object_refused", repository=fqrn, key=key, reason=reason, category=category,
                                 etag=etag))

    def record(self, fqrn: str, refusals: Optional[Dict]):
        """A sync run's refusals: a log line and a count per object refused for the first time, a line per refusal
        cleared, the current list into the status file."""
        if not isinstance(refusals, dict):
            return
        for item in refusals.get("new") or []:
            self.refused(fqrn, str(item.get("key", "")), str(item.get("reason", "")),
                         str(item.get("category") or "other"), str(item.get("etag") or ""))
        for key in refusals.get("cleared") or []:
            log.info("refusal cleared: %s", key, extra=fields(event="refusal_cleared", repository=fqrn, key=key))
        current = refusals.get("current") or []
        self.status.refusals(fqrn, current, refusals.get("count", len(current)))
