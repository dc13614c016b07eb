#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: cvmfs_sync
short_description: Mirror an S3 bucket prefix into a CVMFS repository, atomically
version_added: 0.1.0
description:
  - "Makes C(/cvmfs/<repository>) hold exactly what C(s3://<bucket>/<prefix>) holds: object C(<prefix><path>)
    becomes file C(/cvmfs/<repository>/<path>); folders are kept, folders emptied by deletions are removed."
  - Tarballs (C(.tar), C(.tar.gz), C(.tgz)) are published as a folder named after the tarball without its
    extension. A replaced tarball is unpacked in the staging folder (Python's safe extraction, filter C(data)) and
    swapped for the folder's old content inside the plain-file transaction, so clients see the old content or
    exactly the new members in one revision. A tarball whose folder does not exist yet is streamed (decompressed
    on the fly) to C(cvmfs_server ingest -t -). Deleting the tarball object removes the folder.
    O(tarballs=false) publishes them as plain files.
  - "New and changed objects are downloaded in parallel into a staging folder first; only then is a transaction
    opened, the changes applied locally and published (C(publish -f), from C(/), so a reader holding a file open
    never makes it fail). Plain files, deletions and replaced tarballs are published in one transaction, or in
    several complete ones when applying would not fit in the gateway's lease time (O(max_lease_seconds)); then
    each new tarball with its own C(cvmfs_server ingest). Every step is atomic: a failure aborts it
    (C(abort -f)) and leaves what was published before intact. The revision is read from the repository's
    C(rdonly) mount (attribute C(revision)), never from command output."
  - "One sync per repository per host: the run holds a lock (C(<state_dir>/<repository>.lock)) from start to end;
    a second run waits for it (O(lock_timeout)). Running as root, the files the sync writes are given to the
    repository owner (C(CVMFS_USER)) before they are published."
  - What was published is remembered per repository in a state file (object key, ETag, size), written only
    after a successful publish. Without a trustworthy state file (first run, lost, corrupt, or a crash between
    publishing and recording) the module compares the whole bucket with the published files (size, and MD5 for
    single-part uploads), so a lost state costs a re-check, never a wrong repository.
  - "Keys that would escape the repository or that CVMFS reserves are refused and reported, never applied:
    C(..), C(.) or empty segments, control characters, a top-level C(.cvmfs), overlay whiteouts C(.wh.*),
    C(.cvmfsautocatalog), keys outside O(prefix), and paths that clash with another object (a file where a
    folder is needed). A tarball is judged as extraction would resolve it (the standard library's C(data)
    extraction filter, links resolved through the tarball's own earlier links); a member that would land or
    point outside its folder, a hard link, a device file, a whiteout or a top-level C(.cvmfs) refuses the whole
    tarball, and so does passing a limit (O(tarball_max_expanded_bytes), O(tarball_max_members),
    O(tarball_max_ratio))."
  - "A refusal is a per-object outcome: the run publishes everything else and succeeds. It is remembered with the
    object's ETag (C(<state_dir>/<repository>.refused.json)), so that version is not downloaded again; a new
    upload or the deletion of the object clears it. The uploader finds the list in their bucket (O(report_key))."
author:
  - cvmfs-publisher developers (@infn-cloud)
extends_documentation_fragment:
  - infn_cloud.cvmfs_publisher.rgw
  - infn_cloud.cvmfs_publisher.cvmfs
attributes:
  check_mode:
    support: full
    description: Lists (or reads the touched keys), plans and reports what would be added, updated, deleted and
      refused; downloads nothing and changes nothing.
  diff_mode:
    support: full
    description: One line per path, C(+) added, C(~) updated, C(-) deleted (up to O(max_reported_paths) each).
  action_group:
    support: full
    description: >-
      Use C(group/infn_cloud.cvmfs_publisher.rgw), C(group/infn_cloud.cvmfs_publisher.cvmfs) or
      C(group/infn_cloud.cvmfs_publisher.all) in C(module_defaults) to set its connection options once.
    membership:
      - infn_cloud.cvmfs_publisher.rgw
      - infn_cloud.cvmfs_publisher.cvmfs
      - infn_cloud.cvmfs_publisher.all
options:
  repository:
    description:
      - Fully qualified name of the repository, for example C(alice.infn.it). It must exist on this publisher.
    type: str
    required: true
    aliases: [fqrn, name]
  bucket:
    description:
      - The bucket to mirror. Defaults to the repository's short name (C(alice) for C(alice.infn.it)).
    type: str
  prefix:
    description:
      - Only objects under this prefix are published, with the prefix removed from their path.
    type: str
    default: cvmfs/
  mode:
    description:
      - V(full) lists the whole prefix and applies every difference, deletions included.
      - V(changes) reconciles only O(keys) with the bucket's current state (an object that exists is ensured, one
        that is gone is removed), so the order and duplicates of the events that named them do not matter.
        Without a trustworthy state file it does a V(full) run instead.
    type: str
    choices: [changes, full]
    default: full
  keys:
    description:
      - With O(mode=changes), the object keys that events touched (full keys, prefix included).
    type: list
    elements: str
    default: []
  tarballs:
    description:
      - Whether C(.tar), C(.tar.gz) and C(.tgz) objects are ingested as folders (V(true)) or published as files.
    type: bool
    default: true
  concurrency:
    description:
      - Parallel downloads (and HeadObject requests).
    type: int
    default: 16
  state_dir:
    description:
      - Folder of the state files, one C(<repository>.json) per repository.
      - Defaults to C(/var/lib/cvmfs-publisher/state) under O(cvmfs_root).
    type: path
  staging_dir:
    description:
      - Folder where objects are downloaded before the transaction opens; a private sub-folder per run is
        removed at the end. It needs room for the run's new and changed objects.
      - Defaults to C(/var/spool/cvmfs-publisher/staging) under O(cvmfs_root).
    type: path
  abort_stale_transaction:
    description:
      - A transaction (or a lone C(session_token)) left open by an interrupted sync is aborted with C(abort -f)
        first. With V(false) the module fails instead.
      - A transaction the sync did not open (an operator's C(cvmfs_server transaction), another tool's) is never
        aborted; the module fails naming it and the commands that close it. The sync recognises its own by the
        marker C(<state_dir>/<repository>.transaction) it writes before opening one.
    type: bool
    default: true
  lock_timeout:
    description:
      - Seconds to wait for another sync of the same repository on this host (the lock
        C(<state_dir>/<repository>.lock)) before failing; the other run's transaction is never touched.
    type: int
    default: 3600
  max_lease_seconds:
    description:
      - The repository gateway's lease time (C(max_lease_time), 7200 by default on the gateway). Applying changes
        may use a third of it, leaving the rest for C(publish); a sync that would take longer is split into several
        transactions, each published complete. A single tarball ingest cannot be split.
    type: int
    default: 7200
  transaction_retries:
    description:
      - How many times opening a transaction (or an ingest) is retried, with jittered exponential backoff, when
        C(cvmfs_server transaction) exits with 16 (gateway lease busy) or 17 (already in a transaction), or
        C(cvmfs_server ingest) exits with 1 because it could not start its transaction.
    type: int
    default: 5
  max_reported_paths:
    description:
      - At most this many paths per list (added, updated, deleted, refused) in the result and the diff.
    type: int
    default: 100
  report_key:
    description:
      - Where the uploader's report goes in the bucket, rewritten after each run that refused or cleared something
        (JSON, every refused object with its key, ETag, reason and since when). It must lie outside O(prefix),
        so it is neither published nor notified. An empty string switches the report off.
    type: str
    default: .cvmfs-publisher/report.json
  tarball_max_expanded_bytes:
    description:
      - A tarball whose members add up to more bytes than this is refused (the figure is in the reason).
        Default 20 GiB.
    type: int
  tarball_max_members:
    description:
      - A tarball with more members than this is refused. Default 1,000,000.
    type: int
  tarball_max_ratio:
    description:
      - A tarball that expands more than this many times its stored size is refused (counted once it expands
        past 16 MiB, so small archives are never refused for tar's padding). Default 200.
    type: int
notes:
  - The state file and the staging folder must not be shared by two publishers of the same repository; the lock
    makes runs on one host take turns, the consumer's single active consumer does it across hosts.
  - With a real repository gateway, C(cvmfs_server ingest) refuses to delete and add in the same call, and reads
    uncompressed tar only; the module never asks it to (replacements go through the transaction, compressed
    tarballs are decompressed on the fly).
  - Replacing a tarball needs room in the staging folder for its unpacked content.
seealso:
  - module: infn_cloud.cvmfs_publisher.cvmfs_repository
  - name: CernVM-FS ingest
    description: How C(cvmfs_server ingest) publishes a tarball.
    link: https://cvmfs.readthedocs.io/en/stable/cpt-repo.html#ingesting-tarballs
"""

EXAMPLES = r"""
- name: Full mirror of s3://alice/cvmfs/ into /cvmfs/alice.infn.it
  infn_cloud.cvmfs_publisher.cvmfs_sync:
    repository: alice.infn.it
    endpoint_url: https://rgw.example.org
    access_key_file: /etc/cvmfs-publisher/rgw_access_key
    secret_key_file: /etc/cvmfs-publisher/rgw_secret_key

- name: Apply what two events touched
  infn_cloud.cvmfs_publisher.cvmfs_sync:
    repository: alice.infn.it
    mode: changes
    keys:
      - cvmfs/sw/v2/bin/tool
      - cvmfs/sw/v1.tar.gz
    endpoint_url: https://rgw.example.org
    access_key_file: /etc/cvmfs-publisher/rgw_access_key
    secret_key_file: /etc/cvmfs-publisher/rgw_secret_key
"""

RETURN = r"""
mode:
  description: The mode actually run (V(full) when V(changes) was asked without a trustworthy state).
  returned: always
  type: str
state_rebuilt:
  description: Why the state file was not trusted and the published tree was re-checked instead.
  returned: when the state file was missing or not trusted
  type: str
added:
  description: Objects added to the repository (predicted in check mode).
  returned: always
  type: int
updated:
  description: Objects whose file or tarball folder was replaced.
  returned: always
  type: int
deleted:
  description: Objects whose file or tarball folder was removed.
  returned: always
  type: int
unchanged:
  description: Objects already published as they are in the bucket.
  returned: always
  type: int
refused:
  description: Objects refused now (never applied), this run's and those remembered from earlier runs.
  returned: always
  type: int
refused_objects:
  description: The refused objects with the reason, its kind (C(key), C(conflict), C(tarball), C(limit),
    C(corrupt)), the ETag refused and since when, up to O(max_reported_paths).
  returned: always
  type: list
  elements: dict
  sample: [{"key": "cvmfs/../etc/passwd", "reason": "key has a '..' path segment", "category": "key",
            "etag": "", "since": 1764694800.0}]
refusals:
  description: What this run changed about refusals, for the daemon's log and metrics; C(current) is
    RV(refused_objects), C(new) the objects refused for the first time (or in a new version), C(cleared) the keys
    whose refusal was lifted (fixed, deleted), C(skipped) the changed objects not even downloaded because that
    same version was refused before.
  returned: always
  type: dict
  sample: {"count": 1, "current": [], "new": [], "cleared": ["cvmfs/sw/v1.tar.gz"], "skipped": 0}
report_error:
  description: Why the uploader's report could not be written into the bucket (the next run tries again).
  returned: when writing the report failed
  type: str
paths:
  description: Repository paths added, updated and deleted, up to O(max_reported_paths) each.
  returned: always
  type: dict
  sample: {"added": ["sw/v1/bin/tool"], "updated": [], "deleted": []}
bytes_downloaded:
  description: Bytes downloaded into staging.
  returned: always
  type: int
objects_downloaded:
  description: Objects downloaded into staging.
  returned: always
  type: int
revision:
  description: The last revision this run published, as the repository's C(rdonly) mount shows it; null when
    nothing was published (or the attribute could not be read).
  returned: always
  type: int
revisions:
  description: Every revision this run published (the plain-file transactions, then one per new tarball ingest).
  returned: always
  type: list
  elements: int
split_transactions:
  description: How many extra transactions were needed because applying did not fit in the lease time.
  returned: when a run was split
  type: int
stale_transaction_aborted:
  description: Whether a transaction left open by an interrupted sync was found at start and aborted (or would be,
    in check mode).
  returned: always
  type: bool
durations:
  description: Seconds spent planning (listing or HeadObject, comparing), downloading, and with transactions
    open (apply, publish, ingests); C(lock_wait) when the run waited for another sync of the repository.
  returned: always
  type: dict
  sample: {"plan": 0.41, "download": 3.2, "transaction": 0.8}
"""

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _cvmfs as cvmfs
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw import client as rgw
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _sync as sync
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._module import PublisherModule
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._naming import DEFAULT_PREFIX
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._refusals import DEFAULT_REPORT_KEY
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._tarball import LIMIT_OPTIONS
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._transaction import (
    DEFAULT_LOCK_TIMEOUT,
    DEFAULT_MAX_LEASE_SECONDS,
)

ARGUMENT_SPEC = dict(
    repository=dict(type="str", required=True, aliases=["fqrn", "name"]),
    bucket=dict(type="str"),
    prefix=dict(type="str", default=DEFAULT_PREFIX),
    mode=dict(type="str", choices=["changes", "full"], default="full"),
    keys=dict(type="list", elements="str", default=[], no_log=False),
    tarballs=dict(type="bool", default=True),
    concurrency=dict(type="int", default=16),
    state_dir=dict(type="path"),
    staging_dir=dict(type="path"),
    abort_stale_transaction=dict(type="bool", default=True),
    transaction_retries=dict(type="int", default=5),
    max_reported_paths=dict(type="int", default=100),
    report_key=dict(type="str", default=DEFAULT_REPORT_KEY, no_log=False),
    lock_timeout=dict(type="int", default=DEFAULT_LOCK_TIMEOUT),
    max_lease_seconds=dict(type="int", default=DEFAULT_MAX_LEASE_SECONDS),
    **LIMIT_OPTIONS
)


def diff_of(result):
    lines = []
    for op, sign in (("added", "+"), ("updated", "~"), ("deleted", "-")):
        lines.extend("%s /%s" % (sign, path) for path in result["paths"][op])
    return dict(before_header=result["repository"], after_header=result["repository"],
                prepared="\n".join(lines) + ("\n" if lines else ""))


def main():
    module = PublisherModule(
        argument_spec=ARGUMENT_SPEC,
        option_sets=(rgw.RGW_ARGUMENT_SPEC, cvmfs.CVMFS_ARGSPEC),
        mutually_exclusive=rgw.RGW_MUTUALLY_EXCLUSIVE,
    )

    def run(module):
        result = sync.run(module.params, check_mode=module.check_mode, server=cvmfs.CvmfsServer.for_module(module))
        result["diff"] = diff_of(result)
        return result

    module.run(run)


if __name__ == "__main__":
    main()
