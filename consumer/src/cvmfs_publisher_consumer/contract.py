"""The contract with the collection's playbooks: which playbook a batch runs and the extravars it passes.

- ``provision_playbook`` (playbooks/provision_repository.yml): ``cvmfs_repository`` and either ``cvmfs_subject``
  (a personal repository) or ``cvmfs_group`` (a group repository);
- ``sync_playbook`` (playbooks/sync_repository.yml): ``cvmfs_repository``, ``cvmfs_sync_mode`` (``changes`` or
  ``full``) and, in ``changes`` mode, ``cvmfs_sync_keys`` (the touched object keys).

The playbook names are ``ansible.*`` configuration keys (config.py holds their defaults). Extravars hold only
names and keys, never secrets.
"""
from typing import Dict, Tuple

from .batching import CHANGES, PROVISION, Batch
from .messages import ProvisionRequest

PROVISION_PLAYBOOK = "provision_playbook"
SYNC_PLAYBOOK = "sync_playbook"


def provision(request: ProvisionRequest) -> Tuple[str, Dict]:
    extravars = {"cvmfs_repository": request.repository}
    if request.subject:
        extravars["cvmfs_subject"] = request.subject
    else:
        extravars["cvmfs_group"] = request.group
    return PROVISION_PLAYBOOK, extravars


def sync(fqrn: str, mode: str, keys=()) -> Tuple[str, Dict]:
    extravars = {"cvmfs_repository": fqrn, "cvmfs_sync_mode": mode}
    if mode == CHANGES:
        extravars["cvmfs_sync_keys"] = list(keys)
    return SYNC_PLAYBOOK, extravars


def for_batch(batch: Batch) -> Tuple[str, Dict]:
    """(playbook configuration key, extravars) of the run a batch needs."""
    if batch.mode == PROVISION:
        return provision(batch.request)
    return sync(batch.lane, batch.mode, batch.keys)
