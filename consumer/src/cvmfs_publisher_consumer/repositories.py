"""Which repositories this host has provisioned: the ``repositories.d`` entries of cvmfs_server, filtered by the
configured fqrn patterns. Shared by the daemon, ``cvmfs-publisher status`` and the Event-Driven Ansible source
(extensions/eda), so one rule decides which queues are consumed. Pure apart from listing one folder.
"""
import fnmatch
import logging
import os
from typing import Dict

from .logs import fields
from .messages import MessageError, short_name, validate_fqrn

log = logging.getLogger("cvmfs_publisher")


def discover_repositories(config_dir: str, include=("*",)) -> Dict[str, str]:
    """short name -> fqrn of the repositories provisioned on this host (``repositories.d`` entries) that match
    one of the ``include`` patterns."""
    found = {}
    try:
        names = sorted(os.listdir(config_dir))
    except FileNotFoundError:
        return found  # no repository created on this host yet
    except OSError as exc:
        log.warning("cannot list repositories in %s: %s", config_dir, exc.strerror,
                    extra=fields(event="discovery_failed"))
        return found
    for name in names:
        if not os.path.isdir(os.path.join(config_dir, name)) or not included(name, include):
            continue
        try:
            found[short_name(validate_fqrn(name))] = name
        except MessageError as exc:
            log.warning("skipping %s: %s", name, exc, extra=fields(event="discovery_skipped"))
    return found


def included(fqrn: str, include) -> bool:
    return any(fnmatch.fnmatchcase(fqrn, pattern) for pattern in include)
