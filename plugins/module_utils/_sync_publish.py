# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""The sync engine's publishing steps: staged changes become published revisions.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.

1. Replaced tarballs (their folder exists in the repository) are unpacked into staging first, with the standard
   library's safe extraction (``tarfile`` filter ``"data"``), outside any transaction.
2. Plain-file transactions: deletions (a deleted tarball's folder goes with it), new and changed files, and each
   replaced tarball's folder swapped for its unpacked tree, so clients see the old content or exactly the new one in
   **one** revision, never the folder missing or mixed (a gateway cannot do this in one ``ingest``: ``-t`` with
   ``-d`` is refused). Applying stops when a third of the lease time is used (``max_lease_seconds``); what was
   applied is published and the rest goes into the next transaction: every revision is complete for the changes it
   holds. The last transaction also creates the parent folders new tarballs need.
3. One ``cvmfs_server ingest`` per new tarball (its folder does not exist yet), streamed and decompressed on the
   fly into ``ingest -t -``; ingest opens its own transaction, and exits 1 (never 16/17) when the lease is busy.
   Any other failure of ingest is judged by a probe: when this host can still open (and abort) a transaction of
   the repository, the gateway was reachable and refused that tarball itself, a permanent refusal of that object
   (category ``ingest``); the other tarballs go on. When it cannot, the cause is transient and the run fails.

Every transaction is marked as ours before it is opened (``_transaction.TransactionMarker``) and the state is saved
after each publish. Files written while running as root are given to the repository owner (``CVMFS_USER``) before
they are published: a real publisher publishes files with the uid that wrote them.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import functools
import os
import pwd
import shutil
import tarfile

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _cvmfs as cvmfs
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _refusals as refusals
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _sync_plan as sp
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _transaction as txn
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._module import PublisherError


def _last_lines(text, count=3):
    """The end of a cvmfs_server message (where the reason is), on one line."""
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return " / ".join(lines[-count:])[-500:]


class PublishError(PublisherError):
    """A publishing step that stopped; ``details`` say how far the run got."""


# ---------------------------------------------------------------------------------------------------------------
# Ownership and tarball trees


def owner_ids(config):
    """(uid, gid) the sync must give the files it writes: the repository owner's, when running as root and the
    owner is someone else; None when nothing needs changing."""
    if os.geteuid() != 0:
        return None
    owner = (config or {}).get("CVMFS_USER") or "root"
    try:
        user = pwd.getpwnam(owner)
    except KeyError:
        raise PublishError("the repository owner CVMFS_USER=%s is not a user on this host" % owner)
    return None if user.pw_uid == 0 else (user.pw_uid, user.pw_gid)


def _chown_tree(path, ids):
    if ids is None:
        return
    os.chown(path, ids[0], ids[1], follow_symlinks=False)
    if os.path.isdir(path) and not os.path.islink(path):
        for folder, dirs, files in os.walk(path):
            for name in dirs + files:
                os.chown(os.path.join(folder, name), ids[0], ids[1], follow_symlinks=False)


def unpack_tarball(path, dest):
    """Extract a (validated) tarball into the new folder ``dest`` with the ``"data"`` filter: no absolute or
    escaping names or links, no devices, permissions made safe. Any compression tarfile detects is fine."""
    os.makedirs(dest)
    try:
        with tarfile.open(path, mode="r:*") as archive:
            archive.extractall(dest, filter="data")
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise PublishError("cannot unpack tarball %s: %s" % (path, exc))
    return dest


# ---------------------------------------------------------------------------------------------------------------
# Applying one change inside a transaction


class ApplyError(Exception):
    def __init__(self, change, reason):
        super(ApplyError, self).__init__("%s %s -> /%s: %s" % (change.op, change.key, change.path, reason))
        self.change = change
        self.reason = reason


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _move(source, target, is_tree):
    """Rename into the union dir when on the same file system, else copy (OverlayFS in production)."""
    try:
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        if is_tree:
            shutil.copytree(source, target, symlinks=True)
        else:
            shutil.copyfile(source, target)
            os.chmod(target, 0o644)


class Applier:
    """Applies changes to the union dir one at a time (so that a transaction can stop between any two)."""

    def __init__(self, union, staged, trees, ids):
        self.union = union
        self.staged = staged  # key -> staged file
        self.trees = trees  # key -> unpacked tarball folder (replaced tarballs)
        self.ids = ids
        self.emptied = set()

    def apply(self, change):
        target = os.path.join(self.union, change.path)
        try:
            if change.op == "delete":
                _remove(target)
                self.emptied.add(change.path.rpartition("/")[0])
            elif change.kind == sp.TARBALL:
                _remove(target)
                self._make_parents(change.path)
                _move(self.trees[change.key], target, is_tree=True)
                _chown_tree(target, self.ids)
            else:
                if os.path.isdir(target) and not os.path.islink(target):
                    os.rmdir(target)  # only an emptied directory may be replaced by a file
                self._make_parents(change.path)
                _move(self.staged[change.key], target, is_tree=False)
                _chown_tree(target, self.ids)
        except OSError as exc:
            raise ApplyError(change, exc.strerror or str(exc))

    def finish(self, folders):
        """Remove folders emptied by deletions (deepest first, never the root), then create ``folders``."""
        for rel in sorted(self.emptied - {""}, key=lambda p: p.count("/"), reverse=True):
            while rel:
                try:
                    os.rmdir(os.path.join(self.union, rel))
                except OSError:
                    break  # not empty, or already gone
                rel = rel.rpartition("/")[0]
        self.emptied = set()
        for rel in folders:
            self._make_parents(rel + "/x")

    def _make_parents(self, rel):
        """Create the missing parents of ``rel``, each given to the owner."""
        parts = rel.split("/")[:-1]
        path = self.union
        for part in parts:
            path = os.path.join(path, part)
            if not os.path.isdir(path):
                os.mkdir(path)
                _chown_tree(path, self.ids)


# ---------------------------------------------------------------------------------------------------------------
# The steps


class Publisher:
    """Steps 1-3 of the module docstring for one run. ``result`` is the run's SyncResult, ``store`` its
    StateStore; the state is saved after each publish."""

    def __init__(self, server, fqrn, settings, store, result, refuse=None):
        self.server = server
        self.refuse = refuse  # refuse(change, category, reason): a per-object refusal (see _refusals)
        self.fqrn = fqrn
        self.settings = settings
        self.store = store
        self.result = result
        self.union = server.union_dir(fqrn)
        self.marker = txn.TransactionMarker(settings.state_dir, fqrn)

    def run(self, plan, staged, old_state, folder):
        tarballs = [c for c in plan.changes if c.op != "delete" and c.kind == sp.TARBALL]
        replaced = [c for c in tarballs if os.path.lexists(os.path.join(self.union, c.path))]
        swapped = set(c.key for c in replaced)
        ingests = [c for c in tarballs if c.key not in swapped]
        deletes = [c for c in plan.changes if c.op == "delete"]
        files = [c for c in plan.changes if c.op != "delete" and (c.kind == sp.FILE or c.key in swapped)]
        parents = sorted({c.path.rpartition("/")[0] for c in ingests} - {""})
        missing_parents = [p for p in parents if not os.path.isdir(os.path.join(self.union, p))]
        state = dict(old_state)
        if not deletes and not files and not missing_parents and not ingests:
            if self.result.state_rebuilt is not None:
                self.store.save(plan.new_state(state))  # the re-check verified everything: remember it
            return
        trees = {}
        for index, change in enumerate(replaced):
            trees[change.key] = unpack_tarball(staged[change.key], os.path.join(folder, "tree-%d" % index))
        ids = owner_ids(self.server.read_config(self.fqrn))
        state = self._transactions(deletes + files, missing_parents, Applier(self.union, staged, trees, ids),
                                   plan, state)
        for change in ingests:
            state = self._ingest(change, staged[change.key], plan, state)

    def _transactions(self, pending, missing_parents, applier, plan, state):
        budget = txn.LeaseBudget(self.settings.max_lease_seconds)
        first = True
        while pending or (first and missing_parents):
            first = False
            self._open()
            budget.start()
            applied = []
            try:
                for change in pending:
                    applier.apply(change)
                    applied.append(change)
                    if budget.exhausted():
                        break
                applier.finish(missing_parents if len(applied) == len(pending) else [])
            except ApplyError as exc:
                raise self._failure("applying %s (/%s)" % (exc.change.key, exc.change.path), exc.reason,
                                    key=exc.change.key)
            except BaseException as exc:
                raise self._failure("applying changes", "%s: %s" % (type(exc).__name__, exc))
            try:
                self.server.publish(self.fqrn)
            except PublisherError as exc:
                raise self._failure("publishing", exc.msg)
            self.marker.closed()
            pending = pending[len(applied):]
            state = plan.new_state(state, applied)
            self.store.save(state)
            self.result.published(self.server.mounted_revision(self.fqrn), len(applied))
            if pending:
                self.result.split_transactions += 1
        return state

    def _open(self):
        self.store.publishing()  # before the transaction: a failure to write it must not leave one open
        self.marker.opening("transaction")
        try:
            txn.with_busy_retries(lambda: self.server.transaction(self.fqrn), self.settings.transaction_retries)
        except BaseException:
            self.store.done()
            if not self.server.in_transaction(self.fqrn):
                self.marker.closed()
            raise
        self.marker.opened(self.server, self.fqrn)
        self.result.changed = True

    def _ingest(self, change, tarball, plan, state):
        self.store.publishing()
        self.marker.opening("ingest %s" % change.key)
        self.result.changed = True
        try:
            txn.with_busy_retries(functools.partial(self.server.ingest, self.fqrn, tarball, change.path),
                                  self.settings.transaction_retries, what="ingest %s" % change.key,
                                  busy=txn.ingest_lease_busy)
        except PublisherError as exc:
            failure = self._failure("ingesting tarball %s into /%s" % (change.key, change.path), exc.msg,
                                    key=change.key)
            refused = (self.refuse is not None and isinstance(exc, cvmfs.CvmfsCommandError)
                       and not txn.ingest_lease_busy(exc))
            if not refused or not self._can_open_transaction():
                raise failure
            self.refuse(change, refusals.INGEST, "the gateway's ingest refused this tarball (exit code %d): %s"
                        % (exc.rc, _last_lines(exc.msg)))
            return state
        self.marker.closed()
        state = plan.new_state(state, [change])
        self.store.save(state)
        self.result.published(self.server.mounted_revision(self.fqrn), 1)
        return state

    def _can_open_transaction(self):
        """The probe after an ingest failure: open a transaction (marked as ours) and abort it at once. True when
        the gateway and the repository work, so the failure was that tarball's own."""
        try:
            self._open()
        except PublisherError:
            return False
        finally:
            self.store.done()
        if txn.abort_quietly(self.server, self.fqrn):
            return False
        self.marker.closed()
        return True

    def _failure(self, what, reason, **details):
        """Abort the transaction we opened (ingest aborts its own: 22 then) and describe the failure."""
        self.store.done()
        abort_error = txn.abort_quietly(self.server, self.fqrn)
        if abort_error:
            tail = "; abort -f failed too, the repository may still be in a transaction: %s" % abort_error
        else:
            self.marker.closed()
            tail = "; the transaction was aborted, what was published before is intact"
        details = dict(self.result.progress(), **details)
        return PublishError("sync of %s failed while %s: %s%s" % (self.fqrn, what, reason, tail), **details)
