# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""Owning a repository's transactions on this host: one sync at a time, only our own stale transactions aborted,
transactions that fit the gateway's lease time, a busy lease waited for and a failed run's transaction aborted.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.

- ``RepositoryLock``: an exclusive ``flock`` on ``<state_dir>/<fqrn>.lock`` held for the whole sync. A second sync
  of the same repository on this host waits for it (``lock_timeout`` seconds), then fails naming the holder; it
  never aborts the first one's transaction or removes its staging. The descriptor is close-on-exec, so
  ``cvmfs_server`` and other children never inherit it; a sync process that outlives the daemon that started it
  keeps holding it, so the next run waits for the orphan instead of treating its transaction as stale.
- ``TransactionMarker``: ``<state_dir>/<fqrn>.transaction``, written before the sync opens a transaction (or
  starts an ingest) and removed once it is closed. It records the lease's ``session_token`` once known. A
  transaction left open on the repository is aborted only when the marker says the sync opened it; any other
  (an operator's ``cvmfs_server transaction``, another tool's) fails the run with a message naming it and the
  command that closes it.
- ``LeaseBudget``: a gateway lease lasts ``max_lease_time`` (gateway default 7200 s) and a commit on an expired
  lease is rejected; applying may use a third of ``max_lease_seconds`` and leaves the rest to ``publish`` (which
  re-reads and uploads what was applied). A sync that does not fit is split into several complete transactions.
- ``with_busy_retries``: ``transaction`` (or a gateway ``ingest``) retried while another publisher holds the lease,
  with jittered exponential backoff; ``abort_quietly``: the abort after a failure, whose own failure only adds to
  the message.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import fcntl
import json
import os
import random
import socket
import time

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _cvmfs as cvmfs
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._files import write_atomically
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._module import PublisherError

DEFAULT_LOCK_TIMEOUT = 3600
DEFAULT_MAX_LEASE_SECONDS = 7200
APPLY_SHARE_OF_LEASE = 1.0 / 3
LOCK_POLL_SECONDS = 1.0


class TransactionError(PublisherError):
    """The repository cannot be worked on now (held by another sync, or a transaction we did not open)."""


def _describe_holder(text):
    try:
        holder = json.loads(text)
        return "pid %s on %s since %s" % (holder.get("pid"), holder.get("host"),
                                          time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(holder.get("since", 0))))
    except (ValueError, TypeError, AttributeError):
        return "holder unknown"


def _identity():
    return dict(pid=os.getpid(), host=socket.gethostname(), since=int(time.time()))


class RepositoryLock:
    """One sync per repository per host. Use as a context manager, or acquire()/release()."""

    def __init__(self, state_dir, fqrn, timeout=DEFAULT_LOCK_TIMEOUT, sleep=time.sleep, clock=time.monotonic):
        self.path = os.path.join(state_dir, fqrn + ".lock")
        self.fqrn = fqrn
        self.timeout = timeout
        self.sleep = sleep
        self.clock = clock
        self.fd = None
        self.waited = 0.0

    def acquire(self):
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except (IOError, OSError) as exc:
            raise TransactionError("cannot open the sync lock %s: %s" % (self.path, exc.strerror or exc))
        start = self.clock()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except (IOError, OSError) as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise TransactionError("cannot lock %s: %s" % (self.path, exc.strerror or exc))
            if self.clock() - start >= self.timeout:
                holder = _describe_holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
                os.close(fd)
                raise TransactionError(
                    "another sync of %s is running on this host (%s holds %s); waited %d s (lock_timeout), its "
                    "transaction and staging were left alone" % (self.fqrn, holder, self.path, self.timeout),
                    lock=self.path)
            self.sleep(LOCK_POLL_SECONDS)
        self.waited = round(self.clock() - start, 3)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_identity()).encode(), 0)
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)  # closing drops the flock

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


class TransactionMarker:
    """``<state_dir>/<fqrn>.transaction``: "this sync opened the transaction now on the repository"."""

    def __init__(self, state_dir, fqrn):
        self.path = os.path.join(state_dir, fqrn + ".transaction")

    def read(self):
        try:
            with open(self.path, "r") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None
        except (ValueError, IOError, OSError):
            return {}  # unreadable: still ours (only a sync writes it), without a token to compare

    def opening(self, what):
        """Before ``transaction`` or ``ingest``: a crash from here on leaves a transaction we know is ours."""
        self._write(dict(_identity(), what=what, token=None))

    def opened(self, server, fqrn):
        """Record the lease token the transaction got, so that a later token can be told apart."""
        marker = self.read() or dict(_identity())
        marker["token"] = _read_token(server, fqrn)
        self._write(marker)

    def closed(self):
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def claims(self, server, fqrn):
        """True when the transaction (or lone session_token) on the repository is the one this marker records."""
        marker = self.read()
        if marker is None:
            return False
        recorded = marker.get("token")
        return recorded is None or recorded == _read_token(server, fqrn)

    def _write(self, data):
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            write_atomically(self.path, json.dumps(data))
        except (IOError, OSError) as exc:
            raise TransactionError("cannot write the transaction marker %s: %s" % (self.path, exc.strerror or exc))


def _read_token(server, fqrn):
    try:
        with open(server.session_token(fqrn), "r") as handle:
            return handle.read().strip() or None
    except (IOError, OSError):
        return None


def recover_stale(server, fqrn, marker, allow_abort, check_mode=False):
    """Close what a killed sync left on the repository: an open transaction or a lone ``session_token`` (which the
    next ``transaction`` would otherwise reuse, on a lease that may be gone). Returns what was (or, in check mode,
    would be) aborted, or None. Raises TransactionError for a transaction the sync did not open."""
    in_transaction = server.in_transaction(fqrn)
    if not in_transaction and not server.has_session_token(fqrn):
        if not check_mode:
            marker.closed()
        return None
    what = ("an open transaction" if in_transaction
            else "a lone session_token (a transaction half-closed by a crash)")
    if not marker.claims(server, fqrn):
        raise TransactionError(
            "repository %s has %s that this sync did not open (an operator's 'cvmfs_server transaction' or another "
            "tool's); it is never aborted by the sync. Publish it with 'cvmfs_server publish %s' or discard it with "
            "'cvmfs_server abort -f %s', then run the sync again" % (fqrn, what, fqrn, fqrn), foreign=True)
    if not allow_abort:
        raise TransactionError(
            "repository %s has %s left by an interrupted sync; abort it with 'cvmfs_server abort -f %s' or set "
            "abort_stale_transaction" % (fqrn, what, fqrn))
    if check_mode:
        return what
    try:
        server.abort(fqrn)
    except cvmfs.CvmfsCommandError as exc:
        if exc.rc != cvmfs.RC_NOT_IN_TRANSACTION:  # 22 with a lone token: the token is dropped all the same
            raise TransactionError("cannot abort the stale transaction of %s: %s" % (fqrn, exc.msg))
    marker.closed()
    return what


class LeaseBudget:
    """How long one transaction may spend applying changes before it must publish."""

    def __init__(self, max_lease_seconds=DEFAULT_MAX_LEASE_SECONDS, clock=time.monotonic):
        if max_lease_seconds <= 0:
            raise TransactionError("max_lease_seconds must be positive (the gateway's max_lease_time, default 7200)")
        self.apply_seconds = max_lease_seconds * APPLY_SHARE_OF_LEASE
        self.clock = clock
        self.opened_at = None

    def start(self):
        self.opened_at = self.clock()

    def exhausted(self):
        return self.opened_at is not None and self.clock() - self.opened_at >= self.apply_seconds


# cvmfs_server exit codes worth another attempt: a lease held by another publisher, a transaction just opened.
RETRYABLE_RCS = (cvmfs.RC_LEASE_BUSY, cvmfs.RC_ALREADY_IN_TRANSACTION)


def transaction_busy(exc):
    """``transaction`` could not get its lease now (16) or a transaction is open (17): worth waiting for."""
    return exc.rc in RETRYABLE_RCS


def ingest_lease_busy(exc):
    """``ingest`` could not open its transaction: in gateway mode the script dies with 1 and "Impossible to start a
    transaction" (never 16/17); any other exit 1 (a bad tar, a failed publish) is not worth retrying."""
    return exc.rc == cvmfs.RC_NOT_FOUND and cvmfs.INGEST_NO_TRANSACTION in ((exc.stdout or "") + (exc.stderr or ""))


def with_busy_retries(func, retries, sleep=time.sleep, what="open a transaction", busy=transaction_busy):
    """Call ``func``; while ``busy(error)`` says the lease is busy, retry with jittered exponential backoff, then
    fail with a message that says what was going on."""
    for attempt in range(retries + 1):
        try:
            return func()
        except cvmfs.CvmfsCommandError as exc:
            if not busy(exc):
                raise
            if attempt >= retries:
                why = ("another transaction is open on it" if exc.rc == cvmfs.RC_ALREADY_IN_TRANSACTION
                       else "its lease path is busy (another publisher holds an overlapping lease)")
                raise cvmfs.CvmfsError("cannot %s: %s; gave up after %d attempts (exit code %d): %s"
                                       % (what, why, retries + 1, exc.rc, exc.msg), rc=exc.rc)
            sleep(random.uniform(0.5, 1.0) * min(30.0, 2.0 ** attempt))


def abort_quietly(server, fqrn):
    """``abort -f``; returns None, or the text of its failure for the error message (22 = nothing to abort)."""
    try:
        server.abort(fqrn)
    except cvmfs.CvmfsCommandError as exc:
        if exc.rc != cvmfs.RC_NOT_IN_TRANSACTION:
            return exc.msg
    return None
