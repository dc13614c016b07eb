# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""The sync engine's local file work: the staging folder, downloading into it, checking tarballs there, and
applying staged files to the repository's union dir inside a transaction.

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


# ---------------------------------------------------------------------------------------------------------------
# Applying inside a transaction


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _place(staged, target):
    """Move a staged file into the union dir (a rename when on the same file system, else a local copy)."""
    if os.path.isdir(target) and not os.path.islink(target):
        os.rmdir(target)  # only an emptied directory may be replaced by a file; rmdir refuses anything else
    try:
        os.replace(staged, target)
    except OSError as exc:
        if exc.errno != 18:  # EXDEV: the union dir is another file system (OverlayFS in production)
            raise
        shutil.copyfile(staged, target)
        os.chmod(target, 0o644)


def _prune_empty_dirs(union, rel_dirs):
    """Remove directories emptied by deletions, deepest first, up to (not including) the repository root."""
    for rel in sorted(rel_dirs, key=lambda p: p.count("/"), reverse=True):
        while rel:
            path = os.path.join(union, rel)
            try:
                os.rmdir(path)
            except OSError:
                break  # not empty, or already gone
            rel = rel.rpartition("/")[0]


def apply_plain(union, changes, staged, tarball_parents):
    """Deletions, then files, then the parent folders tarballs need; raises ApplyError naming the object."""
    emptied = set()
    for change in changes:
        if change.op == "delete":
            with _naming_object(change):
                _remove(os.path.join(union, change.path))
                emptied.add(change.path.rpartition("/")[0])
    for change in changes:
        if change.op != "delete" and change.kind == sp.FILE:
            with _naming_object(change):
                target = os.path.join(union, change.path)
                parent = os.path.dirname(target)
                if not os.path.isdir(parent):
                    os.makedirs(parent)
                _place(staged[change.key], target)
    _prune_empty_dirs(union, emptied - {""})
    for rel in tarball_parents:
        os.makedirs(os.path.join(union, rel), exist_ok=True)


class ApplyError(Exception):
    def __init__(self, change, reason):
        super(ApplyError, self).__init__("%s %s -> /%s: %s" % (change.op, change.key, change.path, reason))
        self.change = change
        self.reason = reason


class _naming_object:
    """Turn an OSError while applying one change into an ApplyError that names the object."""

    def __init__(self, change):
        self.change = change

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, OSError):
            raise ApplyError(self.change, exc.strerror or str(exc))
        return False
