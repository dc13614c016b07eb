# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""A gateway publisher's key files ``<keys_dir>/<fqrn>.{crt,pub,gw}``: plan, write atomically, fix mode and owner.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.

Key bytes never leave this file: plans, results and diffs carry a sha256 fingerprint instead.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import grp
import hashlib
import os
import pwd
import stat

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._cvmfs import DEFAULT_KEYS_DIR, CvmfsError
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._files import write_atomically
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._naming import validate_fqrn

# The keys folder option (doc_fragments/cvmfs.py KEYS); an actual path, never prefixed by cvmfs_root.
KEYS_DIR_ARGSPEC = dict(keys_dir=dict(type="path", no_log=False))

# A gateway publisher needs exactly these three files; the modes are the ones `mkfs -k` gives them.
KEY_FILES = (
    # (suffix, Vault field, mode)
    ("crt", "certificateKey", 0o444),
    ("pub", "publicKey", 0o444),
    ("gw", "gatewayKey", 0o400),
)


def key_file_paths(keys_dir, fqrn):
    return [os.path.join(keys_dir, "%s.%s" % (fqrn, suffix)) for suffix, _field, _mode in KEY_FILES]


def missing_key_files(keys_dir, fqrn):
    return [path for path in key_file_paths(keys_dir, fqrn) if not os.path.isfile(path)]


def fingerprint(data):
    """What a diff may show of key material: its sha256, never the bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _resolve_id(value, lookup, what):
    """A numeric id for a user or group given by name or number; None when unset."""
    if value is None or value == "":
        return None
    if str(value).isdigit():
        return int(value)
    try:
        return lookup(value)
    except KeyError:
        raise CvmfsError("%s %r is not a %s on this host" % (what, value, "user" if what == "owner" else what))


def resolve_uid(owner):
    return _resolve_id(owner, lambda name: pwd.getpwnam(name).pw_uid, "owner")


def resolve_gid(group):
    return _resolve_id(group, lambda name: grp.getgrnam(name).gr_gid, "group")


def _read_existing(path):
    """(stat, bytes) of an existing file, None when absent; errors name the file only."""
    try:
        info = os.lstat(path)
        with open(path, "rb") as handle:
            return info, handle.read()
    except FileNotFoundError:
        return None
    except (IOError, OSError) as exc:
        raise CvmfsError("cannot read key file %s: %s" % (path, exc.strerror or exc))


def plan_key_file(path, data, mode, uid=None, gid=None):
    """Compare a key file with what it should be: dict(path, mode, changes, before, after) without key bytes."""
    existing = _read_existing(path)
    wanted_mode = "%04o" % mode
    after = dict(exists=True, mode=wanted_mode, sha256=fingerprint(data))
    if existing is None:
        return dict(path=path, mode=wanted_mode, changes=["created"], before=dict(exists=False), after=after)
    info, current = existing
    current_mode = "%04o" % stat.S_IMODE(info.st_mode)
    changes = []
    if not stat.S_ISREG(info.st_mode):
        raise CvmfsError("key file %s is not a regular file; remove it and run again" % path)
    if current != data:
        changes.append("content changed")
    if current_mode != wanted_mode:
        changes.append("mode %s -> %s" % (current_mode, wanted_mode))
    if uid is not None and info.st_uid != uid:
        changes.append("owner uid %d -> %d" % (info.st_uid, uid))
    if gid is not None and info.st_gid != gid:
        changes.append("group gid %d -> %d" % (info.st_gid, gid))
    before = dict(exists=True, mode=current_mode, sha256=fingerprint(current))
    return dict(path=path, mode=wanted_mode, changes=changes, before=before, after=after)


def apply_key_file(plan, data, mode, uid=None, gid=None):
    """Carry out a plan from plan_key_file: rewrite the content when it differs, else fix mode/owner in place."""
    try:
        if "created" in plan["changes"] or "content changed" in plan["changes"]:
            write_atomically(plan["path"], data, mode, uid, gid)
        elif plan["changes"]:
            os.chmod(plan["path"], mode)
            if uid is not None or gid is not None:
                os.chown(plan["path"], -1 if uid is None else uid, -1 if gid is None else gid)
    except (IOError, OSError) as exc:
        raise CvmfsError("cannot write key file %s: %s" % (plan["path"], exc.strerror or exc))


def ensure_directory(path, check_mode):
    """Create the keys folder (0755) when missing; True when it was (or would be) created."""
    if os.path.isdir(path):
        return False
    if os.path.exists(path):
        raise CvmfsError("keys_dir %s exists and is not a directory" % path)
    if not check_mode:
        try:
            os.makedirs(path, 0o755)
        except (IOError, OSError) as exc:
            raise CvmfsError("cannot create keys_dir %s: %s" % (path, exc.strerror or exc))
    return True


def remove_file(path, check_mode):
    """Remove ``path``; True when it existed."""
    if not os.path.lexists(path):
        return False
    if not check_mode:
        try:
            os.unlink(path)
        except (IOError, OSError) as exc:
            raise CvmfsError("cannot remove %s: %s" % (path, exc.strerror or exc))
    return True


# ---------------------------------------------------------------------------------------------------------------
# What vault_repository_keys does


def ensure_keys(params, check_mode, read_material):
    """vault_repository_keys: install (state present) or remove the three key files; returns the module result.

    ``read_material(params, fqrn, fields)`` returns ({Vault field: text}, the secret's path for the result)
    (``_vault.read_repository_keys``)."""
    fqrn = validate_fqrn(params["repository"])
    keys_dir = params["keys_dir"] or DEFAULT_KEYS_DIR
    if params["state"] != "present":
        return _remove_keys(keys_dir, fqrn, check_mode)
    uid = resolve_uid(params["owner"])
    gid = resolve_gid(params["file_group"])
    material, path = read_material(params, fqrn, [field for _s, field, _m in KEY_FILES])
    created_dir = ensure_directory(keys_dir, check_mode)
    plans = []
    for (_suffix, field, mode), file_path in zip(KEY_FILES, key_file_paths(keys_dir, fqrn)):
        data = material[field].encode("utf-8")
        plan = plan_key_file(file_path, data, mode, uid, gid)
        if plan["changes"] and not check_mode:
            apply_key_file(plan, data, mode, uid, gid)
        plans.append(plan)
    result = _report(plans)
    result["path"] = path
    result["changed"] = result["changed"] or created_dir
    return result


def _remove_keys(keys_dir, fqrn, check_mode):
    plans = []
    for file_path in key_file_paths(keys_dir, fqrn):
        existing = os.path.lexists(file_path)
        before = dict(exists=existing)
        if existing:
            before["mode"] = "%04o" % (os.lstat(file_path).st_mode & 0o7777)
        remove_file(file_path, check_mode)
        plans.append(dict(path=file_path, mode=None, changes=["removed"] if existing else [],
                          before=before, after=dict(exists=False)))
    return _report(plans)


def _report(plans):
    """Result and diff from the per-file plans (which hold fingerprints and modes, never key bytes)."""
    files = [dict(path=p["path"], mode=p["mode"], changed=bool(p["changes"]), changes=p["changes"]) for p in plans]
    diff = dict(before=dict((p["path"], p["before"]) for p in plans),
                after=dict((p["path"], p["after"]) for p in plans))
    return dict(changed=any(f["changed"] for f in files), files=files, diff=diff)
