# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""The action plugin of every module of this collection: the module runs as usual, but the AnsiballZ payload it
is sent in is built once and kept between ansible-playbook runs.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.

ansible-core builds a module's payload (walking the source of every module_utils file it imports, then zipping
them) once per ``ansible-playbook`` process, in a cache under that process's own temporary folder
(``<local_tmp>/ansible-local-<pid>.../ansiballz_cache``). For the consumer, which starts ``ansible-playbook`` for
every batch of events, that build is the largest single cost of a run (about 0.4 s, more than the module itself).
Here that per-process cache folder becomes a link to a folder beside it that outlives the process, named after
everything the payload is made of (ansible-core's version and the collection's modules and module_utils), so a
changed collection or ansible-core never meets an old payload. The payload holds no arguments and nothing of the
target host: ansible-core adds those after reading its cache. When any of this is not as expected (another
ansible-core layout, an unwritable folder) the link is simply not made and ansible-core builds the payload itself.

Each process that links a lasting folder marks it used (its modification time); a lasting folder nobody has used
for ``PRUNE_AFTER`` seconds (an older collection or ansible-core) is removed when a process makes a new link, so
upgrades do not pile payloads up in the temporary folder.

A payload in the lasting folder also gets the bytecode of its Python files (``add_bytecode``, once per payload):
a module runs from the payload's zip, where Python compiles every file it imports on every run (about 0.1 s of a
module's 0.3 s: ansible.module_utils.basic alone 0.08 s) and cannot keep the result. The bytecode is PEP 552's
unchecked-hash kind, stored beside each source: an interpreter of another Python version finds a foreign magic
number and compiles the source as before. The larger payload costs nothing measurable when the module file is run
from disk, but it does through stdin, where Python reads a script much more slowly, so the collection's runs do
not use pipelining (ansible.cfg, the consumer's runner; bench/profile.py measures both).
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import hashlib
import importlib.util
import io
import marshal
import os
import pickle
import shutil
import time
import zipfile

from ansible import constants as C
from ansible.plugins.action.normal import ActionModule as NormalAction
from ansible.release import __version__ as ANSIBLE_VERSION
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._files import write_atomically

_COLLECTION_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PAYLOAD_SOURCES = ("plugins/modules", "plugins/module_utils")
_CACHE_NAME = "ansiballz_cache"  # ansible-core's name for it, under C.DEFAULT_LOCAL_TMP
_PREFIX = "infn_cloud.cvmfs_publisher-ansiballz-"
PRUNE_AFTER = 7 * 24 * 3600


def payload_key(root=_COLLECTION_ROOT, version=ANSIBLE_VERSION):
    """A digest of ansible-core's version and every file the collection's payloads can be made of."""
    digest = hashlib.sha256(version.encode("utf-8"))
    for source in _PAYLOAD_SOURCES:
        base = os.path.join(root, source)
        for folder, dirs, files in os.walk(base):
            dirs.sort()
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, root).encode("utf-8") + b"\0")
                with open(path, "rb") as handle:
                    digest.update(handle.read())
                digest.update(b"\0")
    return digest.hexdigest()[:24]


def share(local_tmp=None):
    """Make this process's payload cache a link to the lasting one; returns the lasting folder, or None."""
    local_tmp = local_tmp or C.DEFAULT_LOCAL_TMP
    link = os.path.join(local_tmp, _CACHE_NAME)
    try:
        if os.path.lexists(link):  # made by an earlier task of this run (or ansible-core itself): keep it
            return os.path.realpath(link) if os.path.islink(link) else None
        lasting = os.path.join(os.path.dirname(local_tmp), _PREFIX + payload_key())
        os.makedirs(lasting, mode=0o700, exist_ok=True)
        os.symlink(lasting, link)
        os.utime(lasting)  # used now: see prune()
    except OSError:
        return None
    prune(os.path.dirname(local_tmp), keep=lasting)
    return lasting


def _names(folder):
    """The sorted names in ``folder``; none when it cannot be read."""
    try:
        return sorted(os.listdir(folder))
    except OSError:
        return []


def prune(folder, keep, now=None, after=PRUNE_AFTER):
    """Remove the lasting payload folders in ``folder`` other than ``keep`` that nobody used for ``after`` seconds;
    returns their names. Best effort: a folder that cannot be removed stays."""
    now = time.time() if now is None else now
    removed = []
    for name in _names(folder):
        path = os.path.join(folder, name)
        if not name.startswith(_PREFIX) or path == keep:
            continue
        try:
            if os.path.islink(path) or now - os.stat(path).st_mtime < after:
                continue
            shutil.rmtree(path)
            removed.append(name)
        except OSError:
            continue
    return removed


_WITH_BYTECODE = ".bytecode"  # beside a payload file: bytecode added to it (or tried and given up: not again)
_UNCHECKED_HASH = (0b01).to_bytes(4, "little")  # PEP 552 flags: hash-based, not checked against the source


def with_bytecode(zip_bytes):
    """The zip with a ``.pyc`` beside each ``.py``: compiled here, as Python itself would (no inherited flags)."""
    source = zipfile.ZipFile(io.BytesIO(zip_bytes))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            data = source.read(info)
            target.writestr(info, data)
            if info.filename.endswith(".py"):
                code = compile(data, info.filename, "exec", dont_inherit=True, optimize=0)
                compiled = zipfile.ZipInfo(info.filename + "c", date_time=info.date_time)
                compiled.compress_type = zipfile.ZIP_DEFLATED
                target.writestr(compiled, importlib.util.MAGIC_NUMBER + _UNCHECKED_HASH
                                + importlib.util.source_hash(data) + marshal.dumps(code))
    return out.getvalue()


def _rewrite_with_bytecode(path):
    """Replace the cached payload at ``path`` by the same payload with bytecode; False when it cannot (another
    ansible-core layout, a source this Python cannot compile, no room): then the payload stays as it was."""
    try:
        with open(path, "rb") as handle:
            cached = pickle.load(handle)
        zip_data = base64.b64encode(with_bytecode(base64.b64decode(cached.zip_data)))
        # Readers meet the old payload or the new one, never half of one; no temporary file is left behind.
        write_atomically(path, pickle.dumps(dataclasses.replace(cached, zip_data=zip_data)),
                         mode=os.stat(path).st_mode & 0o777)
        return True
    except Exception:  # pylint: disable=broad-exception-caught  # best effort, see the docstring
        return False


def add_bytecode(lasting):
    """Give each payload ansible-core cached in ``lasting`` the bytecode of its files, once; returns the names of
    the payloads changed now. Best effort: a payload it cannot read or write stays as ansible-core built it, and is
    not tried again."""
    changed = []
    for name in _names(lasting):
        path = os.path.join(lasting, name)
        # Not a payload: a lock, ansible-core's part file, a temporary file of write_atomically (".<name>.*"), a mark.
        if name.startswith(".") or name.endswith((".lock", "-part", _WITH_BYTECODE)) \
                or os.path.exists(path + _WITH_BYTECODE):
            continue
        try:
            # ansible-core's own lock of that payload file: one process adds the bytecode, the others skip it.
            with open(path + ".lock", "a") as lock:
                fcntl.lockf(lock, fcntl.LOCK_EX)
                if os.path.exists(path + _WITH_BYTECODE):
                    continue
                if _rewrite_with_bytecode(path):
                    changed.append(name)
                open(path + _WITH_BYTECODE, "w").close()  # done, or given up: not again after every task
        except OSError:  # an unwritable folder
            continue
    return changed


class CachedPayloadAction(NormalAction):
    """ansible-core's ``normal`` action, with the lasting payload cache."""

    def run(self, tmp=None, task_vars=None):
        lasting = share()
        try:
            return super().run(tmp, task_vars)
        finally:
            if lasting:
                add_bytecode(lasting)  # after the module ran: only the first run of a new payload pays for it
