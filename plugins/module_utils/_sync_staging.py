# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""The sync engine's local file work: the staging folder, downloading into it, checking tarballs there (applying
what was staged is ``_sync_publish.py``).

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _sync_plan as sp
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _tarball as tarball
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._module import PublisherError
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw.objects import ObjectGone


class StagingError(PublisherError):
    """The staging folder cannot be made."""


def make_staging_folder(staging_root, fqrn):
    """A fresh private folder for this run; folders of this repository left by killed runs are removed first
    (one sync per repository at a time)."""
    try:
        os.makedirs(staging_root, exist_ok=True)
        for name in os.listdir(staging_root):
            if name.startswith(fqrn + "@"):
                shutil.rmtree(os.path.join(staging_root, name), ignore_errors=True)
        return tempfile.mkdtemp(dir=staging_root, prefix=fqrn + "@")  # "@" never occurs in a fqrn
    except (IOError, OSError) as exc:
        raise StagingError("cannot create a staging folder in %s: %s" % (staging_root, exc.strerror or exc))


# ---------------------------------------------------------------------------------------------------------------
# Downloading into staging


def check_free_space(folder, needed):
    """A StagingError (transient: the run fails and is retried) when ``folder``'s file system has less room than
    ``needed`` bytes plus a margin of 5% and 64 MiB."""
    try:
        info = os.statvfs(folder)
    except OSError:
        return  # cannot tell: the downloads themselves will say
    free = info.f_bavail * info.f_frsize
    wanted = int(needed * 1.05) + (64 << 20)
    if needed and free < wanted:
        raise StagingError("not enough free space to stage this run's downloads in %s: %d MiB free, %d MiB needed "
                           "(%d MiB of objects plus a margin); free some space or point staging_dir elsewhere, the "
                           "run is retried" % (folder, free >> 20, wanted >> 20, needed >> 20))


def stage(objects, plan, folder, concurrency, old_state, judge=None, refuse=None):
    """Download every add/update of ``plan`` into ``folder`` (``objects.download(change, folder)``, see
    ``_rgw/objects.py``). Returns ({key: staged path}, bytes downloaded).

    An object gone since it was listed becomes a deletion (or nothing, if it was never published). Each staged
    tarball is judged (``judge(path)``: None, or (kind, reason), see ``_tarball.judge_verdict``); a refused one
    is handed to ``refuse(change, kind, reason)``, dropped from the plan and keeps its previous version.
    The plan is edited in place. Not enough room in ``folder`` for the downloads is a StagingError.
    """
    wanted = plan.downloads
    check_free_space(folder, sum(c.size or 0 for c in wanted))
    if judge is None:
        def judge(path):
            return tarball.judge_verdict(path, scratch_parent=folder)
    staged, gone, verdicts = {}, set(), {}

    def fetch(change):
        """Download, and judge a tarball right away (in the same worker thread)."""
        try:
            path = objects.download(change, folder)
        except ObjectGone:
            return change, None, None
        return change, path, judge(path) if change.kind == sp.TARBALL else None

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for change, path, verdict in pool.map(fetch, wanted):
            if path is None:
                gone.add(change.key)
            else:
                staged[change.key] = path
                verdicts[change.key] = verdict
    downloaded = sum(os.path.getsize(p) for p in staged.values())
    kept = []
    for change in plan.changes:
        if change.key in gone and change.op != "delete":
            if change.key in old_state:
                kind = old_state[change.key][2]
                kept.append(sp.Change("delete", change.key, kind, sp.target_of(change.key, kind, plan.prefix)))
            continue
        if change.op != "delete" and change.kind == sp.TARBALL:
            verdict = verdicts.get(change.key)
            if verdict:
                kind, reason = verdict
                reason = "tarball refused, nothing of it published: %s" % reason
                plan.refuse(change.key, reason, kind)
                if refuse is not None:
                    refuse(change, kind, reason)
                os.unlink(staged.pop(change.key))
                continue
        kept.append(change)
    # Deletions first, as the plan orders them.
    plan.changes = [c for c in kept if c.op == "delete"] + [c for c in kept if c.op != "delete"]
    return staged, downloaded
