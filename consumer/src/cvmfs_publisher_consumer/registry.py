"""The provisioning registry: what every publisher host must have, kept in RabbitMQ.

A provisioning request arrives on the ``publisher`` queue, where the hosts compete for it: whichever host receives
it checks it and appends it, unchanged, to the registry, a RabbitMQ *stream* (``queues.registry``): an append-only,
replicated log that every consumer reads from its first entry. Every host reads the whole registry on every
connection and provisions each repository it has not provisioned yet with that request, so a request reaches every
host, and a host that joins later, was down, or lost a repository converges by itself, with no manual step.

Why a stream and not the queues bound to the notification exchange: a queue name gives the short name only, not
the owner (personal subject or group) that says where the repository's keys are in Vault, so a new host could not
install the keys from it. The stream keeps the request itself, is replicated like the quorum queues (it survives a
broker node), and is read without being consumed.

This module is the host's memory of what it applied (``registry.json`` in the state dir): a request already applied
whose repository still exists here is not run again, so replaying the registry at start costs no run. It keeps the
requests themselves too: every ``provisioning.reapply_interval`` the daemon applies them again (provisioning.py),
which repairs what was changed behind the publisher's back (a topic re-pointed or deleted by a user's keys, a
bucket notification removed).
"""
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, List

from .files import write_text_atomic

FILE_NAME = "registry.json"


@dataclass(frozen=True)
class RegistryRef:
    """Stands where an AMQP delivery would: a registry entry is settled by this host alone (the stream keeps it).
    ``reapply``: the periodic run of a request applied here already (no stream offset)."""
    offset: int
    reapply: bool = False


def digest(request) -> str:
    """The identity of a provisioning request (ProvisionRequest): repository, owner, group; not its form."""
    return digest_of_fields(asdict(request))


def digest_of_fields(fields: Dict) -> str:
    fields = dict(fields)
    fields.pop("form", None)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


class Registry:
    def __init__(self, state_dir: str, config_dir: str):
        self.path = os.path.join(state_dir, FILE_NAME)
        self.config_dir = config_dir          # repositories.d: a repository exists here iff its folder does
        data = self._read()
        self.applied: Dict[str, str] = {str(k): str(v) for k, v in data.get("applied", {}).items()}
        self.requests: Dict[str, Dict] = {str(k): v for k, v in data.get("requests", {}).items()
                                          if isinstance(v, dict)}  # fqrn -> the applied request's fields
        self.pending: Dict[str, str] = {}     # fqrn -> digest of the request waiting or running here

    def _read(self) -> Dict:
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def exists_here(self, fqrn: str) -> bool:
        return os.path.isdir(os.path.join(self.config_dir, fqrn))

    def wanted(self, request) -> bool:
        """Whether this host must run ``request``: not applied here yet (or its repository is gone), not queued."""
        key = digest(request)
        if self.pending.get(request.repository) == key:
            return False
        return not (self.applied.get(request.repository) == key and self.exists_here(request.repository))

    def queued(self, request):
        self.pending[request.repository] = digest(request)

    def finished(self, request, succeeded: bool):
        """A run of ``request`` ended (or its waiting run was dropped, succeeded=False: the next replay queues it
        again); on success it is remembered, so a replay does not run it again."""
        self.pending.pop(request.repository, None)
        if succeeded:
            self.applied[request.repository] = digest(request)
            self.requests[request.repository] = asdict(request)
            self._save()

    def remember(self, request):
        """Keep ``request`` for re-applying if it is the one applied here and not kept yet (written only then: the
        same request in another form, CSV or JSON, is the same request)."""
        key = digest(request)
        kept = self.requests.get(request.repository)
        if self.applied.get(request.repository) == key and (kept is None or digest_of_fields(kept) != key):
            self.requests[request.repository] = asdict(request)
            self._save()

    def to_reapply(self) -> List[Dict]:
        """The fields of each request applied here whose repository still exists here and that is not waiting
        or running already (applied before this memory kept requests: none, until the registry is replayed)."""
        return [self.requests[fqrn] for fqrn in sorted(self.applied)
                if fqrn in self.requests and fqrn not in self.pending and self.exists_here(fqrn)
                and digest_of_fields(self.requests[fqrn]) == self.applied[fqrn]]

    def drop_waiting(self, messages) -> List:
        """Forget the registry entries among ``messages`` (Pending, waiting or interrupted): the next replay queues
        them again. Returns the others, the AMQP messages, which the caller settles."""
        kept = []
        for message in messages:
            if isinstance(message.ref, RegistryRef):
                self.finished(message.request, succeeded=False)
            else:
                kept.append(message)
        return kept

    def _save(self):
        write_text_atomic(self.path, json.dumps({"applied": self.applied, "requests": self.requests}, indent=1,
                                                sort_keys=True))
