# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""What a sync remembers: the state file of the last publish, and rebuilding it from the published tree.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.

The state file (``<state_dir>/<fqrn>.json``, format in ``_sync_plan.py``) is rewritten after each successful
publish; a marker file says "publishing, state not yet recorded" so that a crash in that window leads to a full
re-check instead of trusting an old state.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import os
import stat

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _sync_plan as sp
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._files import write_atomically
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._module import PublisherError

CHUNK_BYTES = 1 << 20


class StateError(PublisherError):
    """The state file cannot be written."""


class StateStore:
    """``<state_dir>/<fqrn>.json`` plus its ``.publishing`` marker."""

    def __init__(self, state_dir, fqrn, identity):
        self.path = os.path.join(state_dir, fqrn + ".json")
        self.marker = self.path + ".publishing"
        self.identity = identity

    def load(self):
        """(state, None) or (None, why it cannot be trusted)."""
        if os.path.exists(self.marker):
            return None, "a previous sync stopped between publishing and recording its state"
        try:
            with open(self.path, "r") as handle:
                text = handle.read()
        except FileNotFoundError:
            return None, "no state file yet (%s)" % self.path
        except (IOError, OSError) as exc:
            return None, "cannot read state file %s: %s" % (self.path, exc.strerror or exc)
        except UnicodeDecodeError as exc:
            return None, "state file %s is not UTF-8 text (%s)" % (self.path, exc.reason)
        return sp.load_state(text, self.identity)

    def publishing(self):
        self._write(self.marker, "publishing\n")

    def save(self, state):
        self._write(self.path, sp.dump_state(state, self.identity))
        self.done()

    def done(self):
        try:
            os.unlink(self.marker)
        except FileNotFoundError:
            pass

    def _write(self, path, text):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_atomically(path, text)
        except (IOError, OSError) as exc:
            raise StateError("cannot write sync state %s: %s" % (path, exc.strerror or exc))


# ---------------------------------------------------------------------------------------------------------------
# Rebuilding lost state from the published tree


def md5_of(path):
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_from_published(union, listing, prefix, tarballs):
    """A state describing what ``union`` (the published tree) holds, trusting only what can be verified:
    a file counts as the listed object when its size matches and, for single-part uploads, its MD5 too.
    Anything else gets an etag that matches nothing, so it is re-downloaded or deleted. Tarball directories
    (of listed tarballs) are left out: their tarballs are re-ingested, replacing them."""
    tarball_dirs = set()
    for key in listing:
        try:
            kind, target = sp.classify(key, prefix, tarballs)
        except sp.Refused:
            continue
        if kind == sp.TARBALL:
            tarball_dirs.add(target)
    state = {}
    for folder, dirs, files in os.walk(union):
        rel_dir = os.path.relpath(folder, union).replace(os.sep, "/")
        rel_dir = "" if rel_dir == "." else rel_dir
        if rel_dir == "":
            dirs[:] = [d for d in dirs if d != ".cvmfs"]
        dirs[:] = [d for d in dirs if (rel_dir + "/" + d if rel_dir else d) not in tarball_dirs]
        for name in files:
            rel = rel_dir + "/" + name if rel_dir else name
            if name in sp.CVMFS_MAGIC_FILES and prefix + rel not in listing:
                continue
            path = os.path.join(folder, name)
            info = os.lstat(path)
            key = prefix + rel
            etag = "unverified"
            listed = listing.get(key)
            if (listed and stat.S_ISREG(info.st_mode) and listed.size == info.st_size
                    and sp.etag_is_md5(listed.etag) and md5_of(path) == listed.etag):
                etag = listed.etag
            state[key] = (etag, info.st_size, sp.FILE)
    return state
