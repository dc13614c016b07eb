# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""A gateway repository as ``cvmfs_repository`` wants it: its upstream, what may differ, and the ensure logic.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.

An existing repository with other settings is reported, never recreated behind an operator's back.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import pwd

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _cvmfs_keys as keys
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._cvmfs import CvmfsError
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._naming import validate_fqrn

DEFAULT_TXN_DIR = "/srv/cvmfs/{fqrn}/data/txn"
DIFF_KEYS = ("exists", "stratum0", "upstream")


class RepositoryMismatch(CvmfsError):
    """The repository exists but was created with other settings; it is never recreated behind an operator's back."""


def upstream_storage(txn_dir, gateway_url):
    """The ``-u`` argument (and ``CVMFS_UPSTREAM_STORAGE``) of a gateway repository."""
    for what, value in (("txn_dir", txn_dir), ("gateway_url", gateway_url)):
        if not value or "," in value:
            raise CvmfsError("%s %r must be non-empty and contain no comma (it is a field of -u gw,<txn_dir>,"
                             "<gateway_url>)" % (what, value))
    return "gw,%s,%s" % (txn_dir, gateway_url)


def default_txn_dir(fqrn):
    return DEFAULT_TXN_DIR.format(fqrn=fqrn)


def repository_mismatches(config, stratum0_url, upstream):
    """The differences between an existing repository's server.conf values and the wanted ones, as messages."""
    problems = []
    for key, wanted in (("CVMFS_STRATUM0", stratum0_url), ("CVMFS_UPSTREAM_STORAGE", upstream)):
        actual = config.get(key)
        if actual != wanted:
            problems.append("%s is %r, wanted %r" % (key, actual, wanted))
    return problems


def ensure_repository(server, params, check_mode):
    """cvmfs_repository: create (``mkfs``) or remove (``rmfs``) one repository; returns the module result."""
    fqrn = validate_fqrn(params["repository"])
    ensure = _ensure_present if params["state"] == "present" else _ensure_absent
    result, before, after = ensure(server, fqrn, params, check_mode)
    result["diff"] = dict(before=dict((k, before[k]) for k in DIFF_KEYS), after=dict((k, after[k]) for k in DIFF_KEYS))
    return result


def _ensure_present(server, fqrn, params, check_mode):
    stratum0 = params["stratum0_url"]
    upstream = upstream_storage(params["txn_dir"] or default_txn_dir(fqrn), params["gateway_url"])
    before = server.repository_facts(fqrn)
    missing = server.missing_parts(fqrn) if before["exists"] else []
    if before["exists"] and not missing:
        problems = repository_mismatches(
            {"CVMFS_STRATUM0": before["stratum0"], "CVMFS_UPSTREAM_STORAGE": before["upstream"]}, stratum0, upstream)
        if problems:
            raise RepositoryMismatch(
                "repository %s exists with other settings (%s); it is not recreated: remove it first if that is "
                "intended" % (fqrn, "; ".join(problems)), repository=before)
        return dict(changed=False, repository=before), before, before
    keys_dir = params["keys_dir"] or server.default_keys_dir()
    owner = params["owner"] or pwd.getpwuid(os.geteuid()).pw_name
    # A half-created repository (mkfs writes its config before keys, spool and mount) is never reported present:
    # it is removed (keeping the keys mkfs imports from) and created again.
    keep_keys = os.path.realpath(keys_dir) == os.path.realpath(server.default_keys_dir())
    extra = {}
    if missing:
        before = dict(before, exists=False)
        extra = dict(repaired=missing, warnings=["repository %s was half-created (missing: %s): it is removed and "
                                                 "created again" % (fqrn, ", ".join(missing))])
    if check_mode:
        predicted = dict(before, exists=True, stratum0=stratum0, upstream=upstream, owner=owner, in_transaction=False)
        command = server.mkfs(fqrn, stratum0, upstream, keys_dir, owner, check_mode=True)
        if missing:
            command = "%s; %s" % (server.rmfs(fqrn, keep_keys=keep_keys, check_mode=True), command)
        return dict(extra, changed=True, command=command, repository=predicted), before, predicted
    missing_keys = keys.missing_key_files(keys_dir, fqrn)
    if missing_keys:
        raise CvmfsError("cannot create %s: key file%s %s missing (install the keys first, e.g. with "
                         "infn_cloud.cvmfs_publisher.vault_repository_keys)"
                         % (fqrn, "s" if len(missing_keys) > 1 else "", ", ".join(missing_keys)))
    removed = ""
    if missing:
        try:
            removed = server.rmfs(fqrn, keep_keys=keep_keys) + "; "
        except CvmfsError as exc:
            fix = server.rmfs(fqrn, keep_keys=keep_keys, check_mode=True)
            raise CvmfsError("repository %s is half-created (missing: %s) and could not be removed: %s; remove it "
                             "with '%s', then run again" % (fqrn, ", ".join(missing), exc.msg, fix),
                             missing=missing)
    command = removed + server.mkfs(fqrn, stratum0, upstream, keys_dir, owner)
    after = server.repository_facts(fqrn)
    if not after["exists"]:
        raise CvmfsError("%s succeeded but %s does not exist" % (command, server.server_conf(fqrn)))
    return dict(extra, changed=True, command=command, repository=after), before, after


def _ensure_absent(server, fqrn, params, check_mode):
    before = server.repository_facts(fqrn)
    absent = dict(name=fqrn, exists=False, stratum0=None, upstream=None, owner=None, in_transaction=False)
    if not before["exists"]:
        return dict(changed=False, repository=before), before, before
    command = server.rmfs(fqrn, keep_keys=params["keep_keys"], check_mode=check_mode)
    if not check_mode:
        absent = server.repository_facts(fqrn)
        if absent["exists"]:
            raise CvmfsError("%s succeeded but %s still exists" % (command, server.server_conf(fqrn)))
    return dict(changed=True, command=command, repository=absent), before, absent
