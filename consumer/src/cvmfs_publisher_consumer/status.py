"""The small status file the daemon keeps in its state dir, read by ``cvmfs-publisher status``.

Per repository: last successful publish, last error and when. Written atomically (rename), so a reader never
sees half a file. Error texts are the runner's redacted summaries: no secrets.
"""
import json
import os
import time
from typing import Dict, Optional

from .files import write_text_atomic

FILE_NAME = "status.json"


def read_status(state_dir: str) -> Optional[Dict]:
    """The last status the daemon wrote, or None (none yet, or unreadable)."""
    try:
        with open(os.path.join(state_dir, FILE_NAME), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


class StatusFile:
    def __init__(self, state_dir: str, clock=time.time):
        self.path = os.path.join(state_dir, FILE_NAME)
        self._clock = clock
        self.data = self.read(state_dir) or {}
        self.data.setdefault("repositories", {})

    @staticmethod
    def read(state_dir: str) -> Optional[Dict]:
        return read_status(state_dir)

    def repository(self, fqrn: str) -> Dict:
        return self.data["repositories"].setdefault(fqrn, {})

    def published(self, fqrn: str, mode: str, keys: int):
        entry = self.repository(fqrn)
        entry.update(last_publish=self._clock(), last_mode=mode, last_keys=keys)

    def failed(self, fqrn: str, error: str):
        entry = self.repository(fqrn)
        entry.update(last_error=error, last_error_at=self._clock())

    def refusals(self, fqrn: str, current, count: int):
        """The objects the last sync run reported as refused (key, etag, reason, category, since)."""
        entry = self.repository(fqrn)
        entry.update(refusals=list(current), refusals_count=count)

    def provisioned(self, fqrn: str):
        entry = self.repository(fqrn)
        entry["provisioned_at"] = self._clock()
        entry.pop("provisioning", None)

    def provisioning(self, fqrn: str, state: str):
        """``started`` or ``failed``: until a provisioning run succeeds, the daemon does not consume the queue of a
        repository it was asked to provision (a half-made one may already show in repositories.d)."""
        self.repository(fqrn)["provisioning"] = state

    def provisioning_unfinished(self, fqrn: str) -> bool:
        return self.data["repositories"].get(fqrn, {}).get("provisioning") in ("started", "failed")

    def save(self, **daemon):
        self.data.update(daemon, updated=self._clock(), pid=os.getpid())
        write_text_atomic(self.path, json.dumps(self.data, indent=1, sort_keys=True))
