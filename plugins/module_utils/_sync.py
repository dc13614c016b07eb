# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""The sync engine: mirror ``s3://<bucket>/<prefix>`` into ``/cvmfs/<fqrn>``, one run from start to end.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.

One run, in order (``_sync_plan.py`` makes every decision):

1. read what the bucket holds: the touched keys (HeadObject, ``changes`` mode) or the whole prefix
   (ListObjectsV2, ``full`` mode), and the state of the last publish (``_sync_state.py``);
2. plan the differences;
3. download new and changed objects, in parallel and streamed, into a private staging folder; check tarballs'
   members there (``_sync_staging.py``). Nothing in the repository has changed yet, and no transaction is open;
4. transactions for plain files, deletions and replaced tarballs (unpacked in staging, swapped in whole), each
   fitting the gateway's lease time; then one ``cvmfs_server ingest`` per new tarball (``_sync_publish.py``).
   Each revision is atomic on its own: a failure aborts that step and leaves every earlier revision as published.

The whole run holds the repository's lock (one sync per repository per host) and first closes what an interrupted
sync of ours left open; a transaction we did not open fails the run (``_transaction.py``).

The bucket is read through an injectable reader (``_rgw/objects.py``'s ``BucketObjects``: ``list(prefix)``,
``head(keys, concurrency)``, ``download(change, folder)``), ``cvmfs_server`` through ``_cvmfs.CvmfsServer``.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _cvmfs as cvmfs
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _naming as naming
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _refusals as refusals_mod
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _sync_plan as sp
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _tarball as tarball
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _transaction as txn
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._module import PublisherError
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw.objects import BucketObjects
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._sync_publish import Publisher
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._sync_staging import (
    make_staging_folder,
    stage,
)
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._sync_state import (
    StateStore,
    state_from_published,
)

DEFAULT_STATE_DIR = "/var/lib/cvmfs-publisher/state"
DEFAULT_STAGING_DIR = "/var/spool/cvmfs-publisher/staging"


class SyncError(PublisherError):
    """A sync that stopped; ``details`` say how far it got (what was published before the failure)."""


@dataclass(frozen=True)
class SyncSettings:
    """One run's settings, checked and with every default filled in."""

    repository: str
    bucket: str
    prefix: str  # empty, or ending with "/"
    mode: str  # "full" or "changes"
    keys: tuple
    tarballs: bool
    concurrency: int  # at least 1
    state_dir: str
    staging_dir: str
    abort_stale_transaction: bool
    transaction_retries: int
    max_reported_paths: int
    report_key: str = refusals_mod.DEFAULT_REPORT_KEY  # the uploader's report in the bucket; "" for none
    limits: tarball.Limits = None  # per-tarball limits (None: the defaults)
    lock_timeout: int = txn.DEFAULT_LOCK_TIMEOUT  # seconds to wait for another sync of the repository
    max_lease_seconds: int = txn.DEFAULT_MAX_LEASE_SECONDS  # the gateway's max_lease_time

    @classmethod
    def from_params(cls, params):
        """From the cvmfs_sync options (its ARGUMENT_SPEC plus ``cvmfs_root``); an invalid name is a SyncError."""
        fqrn = params["repository"]
        try:
            naming.validate_fqrn(fqrn)
            bucket = params.get("bucket") or naming.bucket_name(fqrn)
        except naming.InvalidName as exc:
            raise SyncError(str(exc))
        prefix = params["prefix"]
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        root = params.get("cvmfs_root") or ""
        report_key = params.get("report_key", refusals_mod.DEFAULT_REPORT_KEY) or ""
        problem = refusals_mod.check_report_key(report_key, prefix)
        if problem:
            raise SyncError(problem)
        if params.get("max_lease_seconds", 1) <= 0 or params.get("lock_timeout", 0) < 0:
            raise SyncError("max_lease_seconds must be positive and lock_timeout not negative")
        return cls(
            repository=fqrn, bucket=bucket, prefix=prefix, mode=params["mode"], keys=tuple(params["keys"] or ()),
            tarballs=params["tarballs"], concurrency=max(1, params["concurrency"]),
            state_dir=params.get("state_dir") or cvmfs.rooted(root, DEFAULT_STATE_DIR),
            staging_dir=params.get("staging_dir") or cvmfs.rooted(root, DEFAULT_STAGING_DIR),
            abort_stale_transaction=params["abort_stale_transaction"],
            transaction_retries=params["transaction_retries"], max_reported_paths=params["max_reported_paths"],
            report_key=report_key, limits=tarball.Limits.from_params(params),
            lock_timeout=params.get("lock_timeout", txn.DEFAULT_LOCK_TIMEOUT),
            max_lease_seconds=params.get("max_lease_seconds", txn.DEFAULT_MAX_LEASE_SECONDS))


@dataclass
class SyncResult:
    """What one run did (or, in check mode, would do); ``as_dict`` is the module's result (see its RETURN)."""

    settings: SyncSettings
    mode: str = None
    changed: bool = False
    stale_transaction_aborted: bool = False
    state_rebuilt: str = None  # why the state file was not trusted
    plan: sp.Plan = None
    revisions: list = field(default_factory=list)
    published_changes: int = 0
    split_transactions: int = 0  # extra transactions because one did not fit the lease time
    bytes_downloaded: int = 0
    objects_downloaded: int = 0
    durations: dict = field(default_factory=dict)
    refusals: refusals_mod.Refusals = None
    report_error: str = None  # why the uploader's report could not be written (tried again next run)

    @property
    def revision(self):
        return self.revisions[-1] if self.revisions else None

    def published(self, revision, count):
        self.revisions.append(revision)
        self.published_changes += count

    def progress(self):
        """How far a failed run got, for SyncError's details."""
        return dict(revisions=list(self.revisions), published_changes=self.published_changes)

    def as_dict(self):
        settings, plan, limit = self.settings, self.plan, self.settings.max_reported_paths
        result = dict(
            changed=self.changed, repository=settings.repository, bucket=settings.bucket, prefix=settings.prefix,
            requested_mode=settings.mode, mode=self.mode, stale_transaction_aborted=self.stale_transaction_aborted,
            revision=self.revision, revisions=list(self.revisions), bytes_downloaded=self.bytes_downloaded,
            objects_downloaded=self.objects_downloaded, durations=dict(self.durations),
            added=plan.count("add"), updated=plan.count("update"), deleted=plan.count("delete"),
            unchanged=plan.unchanged, refused=len(self.refusals.entries),
            refused_objects=self.refusals.current()[:limit], refusals=self.refusals.result(limit),
            paths=dict(added=_paths(plan.changes, "add", limit), updated=_paths(plan.changes, "update", limit),
                       deleted=_paths(plan.changes, "delete", limit)))
        if self.state_rebuilt is not None:
            result["state_rebuilt"] = self.state_rebuilt
        if self.revisions:
            result["published_changes"] = self.published_changes
        if self.report_error:
            result["report_error"] = self.report_error
        if self.split_transactions:
            result["split_transactions"] = self.split_transactions
        return result


def _paths(changes, op, limit):
    return [c.path for c in changes if c.op == op][:limit]


def run(params, check_mode=False, server=None):
    """The cvmfs_sync module's work: settings from its options, RGW and cvmfs_server from theirs; the result dict."""
    settings = SyncSettings.from_params(params)
    server = server or cvmfs.CvmfsServer.from_params(params)
    objects = BucketObjects.from_params(params, settings.bucket, settings.concurrency)
    return sync(settings, server, objects, check_mode).as_dict()


def sync(settings, server, objects, check_mode=False):
    """Mirror the bucket (read through ``objects``) into the repository; returns a SyncResult."""
    fqrn = settings.repository
    if server.read_config(fqrn) is None:
        raise SyncError("repository %s does not exist on this publisher (create it with the cvmfs_repository "
                        "module or playbooks/provision_repository.yml)" % fqrn)
    missing = server.missing_parts(fqrn)
    if missing:
        raise SyncError("repository %s is half-created (missing: %s); run playbooks/provision_repository.yml "
                        "(the cvmfs_repository module repairs it)" % (fqrn, ", ".join(missing)), missing=missing)
    result = SyncResult(settings)
    if check_mode:  # changes nothing: needs no lock
        return _run(settings, server, objects, result, check_mode=True)
    lock = txn.RepositoryLock(settings.state_dir, fqrn, settings.lock_timeout)
    try:
        lock.acquire()
    except PublisherError as exc:
        raise SyncError(exc.msg, **exc.details)
    try:
        if lock.waited >= txn.LOCK_POLL_SECONDS:
            result.durations["lock_wait"] = lock.waited
        return _run(settings, server, objects, result, check_mode=False)
    finally:
        lock.release()


def _run(settings, server, objects, result, check_mode):
    fqrn = settings.repository
    timer = time.monotonic()
    _recover_stale_transaction(settings, server, result, check_mode)
    refusal_store = _refusal_store(settings)
    result.refusals, remembered = refusal_store.load()
    observed = {}
    plan, old_state = _plan(settings, server, objects, result, observed)
    now = time.time()
    result.refusals.skip_known(plan)
    result.refusals.settle(plan, observed, result.mode == "full", now)
    result.plan = plan
    result.durations["plan"] = round(time.monotonic() - timer, 3)
    if check_mode:
        result.changed = result.changed or bool(plan.changes)
        return result

    def refuse(change, kind, reason):
        result.refusals.refuse(change.key, change.etag, reason, kind, now)

    folder = make_staging_folder(settings.staging_dir, fqrn)
    try:
        timer = time.monotonic()
        staged, result.bytes_downloaded = stage(
            objects, plan, folder, settings.concurrency, old_state,
            judge=lambda path: tarball.judge_verdict(path, settings.limits, scratch_parent=folder), refuse=refuse)
        result.objects_downloaded = len(staged)
        result.durations["download"] = round(time.monotonic() - timer, 3)
        timer = time.monotonic()
        try:
            Publisher(server, fqrn, settings, _store(settings), result, refuse).run(plan, staged, old_state, folder)
        except PublisherError as exc:
            raise SyncError(exc.msg, **exc.details)
        result.durations["transaction"] = round(time.monotonic() - timer, 3)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    _record_refusals(settings, objects, result, refusal_store, remembered.get("report_digest"), now)
    return result


def _refusal_store(settings):
    return refusals_mod.RefusalStore(settings.state_dir, settings.repository,
                                     sp.state_identity(settings.repository, settings.bucket, settings.prefix,
                                                       settings.tarballs))


def _record_refusals(settings, objects, result, store, written_digest, now):
    """After a successful run: remember the refusals, and rewrite the uploader's report when what it says changed
    (a failure to write it is reported, not fatal: the next run tries again)."""
    refusals, old_digest = result.refusals, written_digest
    current = json.dumps([(r["key"], r["etag"], r["reason"]) for r in refusals.current()])
    digest = hashlib.sha256(current.encode("utf-8")).hexdigest()
    # A bucket that never had a refusal gets no report at all.
    if settings.report_key and digest != written_digest and (refusals.entries or written_digest):
        try:
            objects.put(settings.report_key, refusals_mod.report_json(
                settings.repository, settings.bucket, settings.prefix, refusals, now).encode("utf-8"))
            written_digest = digest
        except PublisherError as exc:
            result.report_error = exc.msg
    if refusals.changed or written_digest != old_digest:
        try:
            store.save(refusals, written_digest)
        except (IOError, OSError) as exc:
            raise SyncError("cannot write the refusals file %s: %s" % (store.path, exc.strerror or exc))


def _recover_stale_transaction(settings, server, result, check_mode):
    """What an interrupted sync of ours left open is aborted; a transaction we did not open fails the run."""
    fqrn = settings.repository
    marker = txn.TransactionMarker(settings.state_dir, fqrn)
    try:
        aborted = txn.recover_stale(server, fqrn, marker, settings.abort_stale_transaction, check_mode)
    except PublisherError as exc:
        raise SyncError(exc.msg, **exc.details)
    if aborted:
        result.stale_transaction_aborted = True
        result.changed = True


def _store(settings):
    return StateStore(settings.state_dir, settings.repository,
                      sp.state_identity(settings.repository, settings.bucket, settings.prefix, settings.tarballs))


def _recorded(observations, observed):
    """Pass the observations through, noting key -> etag (None: absent) in ``observed``."""
    for obs in observations:
        observed[obs.key] = obs.etag
        yield obs


def _plan(settings, server, objects, result, observed):
    """Steps 1 and 2 of the module docstring: (plan, the state it was made against); ``observed`` gets what the
    bucket holds for every key looked at."""
    prefix, tarballs = settings.prefix, settings.tarballs
    old_state, why = _store(settings).load()
    if old_state is not None and settings.mode == "changes":
        result.mode = "changes"
        observations = _observe_keys(objects, settings.keys, prefix, settings.concurrency)
        return sp.plan(old_state, _recorded(observations, observed), prefix, tarballs, complete=False), old_state
    result.mode = "full"
    if old_state is not None:
        return sp.plan(old_state, _recorded(objects.list(prefix), observed), prefix, tarballs,
                       complete=True), old_state
    # No trustworthy state: compare the whole bucket with what is published (costs a re-check, never a wrong
    # repository).
    result.state_rebuilt = why
    listing = {}
    for obs in _recorded(objects.list(prefix), observed):
        listing[obs.key] = obs
    old_state = state_from_published(server.union_dir(settings.repository), listing, prefix, tarballs)
    return sp.plan(old_state, listing.values(), prefix, tarballs, complete=True), old_state


def _observe_keys(objects, keys, prefix, concurrency):
    """The current state of each touched key; keys the plan will refuse anyway are not asked about (they get a
    placeholder observation)."""
    unique = sorted(set(keys))
    asked = []
    for key in unique:
        try:
            sp.object_path(key, prefix)
            asked.append(key)
        except sp.Refused:
            pass
    seen = dict((obs.key, obs) for obs in objects.head(asked, concurrency))
    return [seen[key] if key in seen else sp.Observation(key, "", 0) for key in unique]
