#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: cvmfs_repository
short_description: Create or remove a CVMFS repository on a gateway publisher
version_added: 0.1.0
description:
  - Creates a CVMFS repository in gateway mode with
    C(cvmfs_server mkfs -w <stratum0_url> -u gw,<txn_dir>,<gateway_url> -k <keys_dir> -o <owner> <fqrn>), or removes
    it with C(cvmfs_server rmfs -f [-p] <fqrn>).
  - Whether the repository exists, and with which settings, is read from its configuration
    C(/etc/cvmfs/repositories.d/<fqrn>/server.conf) (values C(CVMFS_STRATUM0) and C(CVMFS_UPSTREAM_STORAGE)), not from
    the tool's messages.
  - An existing repository created with another Stratum-0 URL or upstream is never recreated (that would drop its
    local state); the module fails and names both values.
  - "A half-created repository (C(mkfs) writes the configuration before importing the keys and creating the spool
    and union folder, so a failed C(mkfs) leaves one) is never reported as present: it is removed
    (C(rmfs -f), keeping the keys it would import again) and created again, with a warning naming what was
    missing."
  - The keys C(<fqrn>.crt), C(<fqrn>.pub) and C(<fqrn>.gw) must be in O(keys_dir) before the repository is created;
    M(infn_cloud.cvmfs_publisher.vault_repository_keys) installs them.
author:
  - cvmfs-publisher developers (@infn-cloud)
extends_documentation_fragment:
  - infn_cloud.cvmfs_publisher.cvmfs
  - infn_cloud.cvmfs_publisher.cvmfs.keys
  - infn_cloud.cvmfs_publisher.batch
attributes:
  check_mode:
    support: full
    description: Reads the repository's configuration and reports whether it would be created or removed.
  diff_mode:
    support: full
    description: Before and after of C(exists), C(stratum0) and C(upstream).
  action_group:
    support: full
    description: >-
      Use C(group/infn_cloud.cvmfs_publisher.cvmfs) or C(group/infn_cloud.cvmfs_publisher.all) in C(module_defaults)
      to set its connection options once.
    membership:
      - infn_cloud.cvmfs_publisher.cvmfs
      - infn_cloud.cvmfs_publisher.all
options:
  repository:
    description:
      - Fully qualified name of the repository, for example C(alice.infn.it).
      - The same option name as in M(infn_cloud.cvmfs_publisher.cvmfs_sync) and
        M(infn_cloud.cvmfs_publisher.vault_repository_keys); C(name) is kept as an alias.
    type: str
    required: true
    aliases: [fqrn, name]
  state:
    description:
      - Whether the repository should exist.
    type: str
    choices: [present, absent]
    default: present
  stratum0_url:
    description:
      - The full URL of this repository on the Stratum-0 (passed to C(mkfs -w)), for example
        C(https://stratum0.example.org/cvmfs/alice.infn.it). The playbooks build it as C(<base>/<fqrn>).
      - Required with O(state=present).
    type: str
  gateway_url:
    description:
      - The repository gateway API URL, the third field of the upstream, for example
        C(https://gateway.example.org:4929/api/v1).
      - Required with O(state=present).
    type: str
  txn_dir:
    description:
      - Local folder for the transaction's temporary files, the second field of the upstream.
      - Defaults to C(/srv/cvmfs/<fqrn>/data/txn).
    type: str
  owner:
    description:
      - User that owns the repository (C(mkfs -o)); publishing runs as this user.
      - Defaults to the user running the module.
    type: str
  keep_keys:
    description:
      - With O(state=absent), keep the key files in O(keys_dir) (C(rmfs -p)). By default C(cvmfs_server) deletes them.
    type: bool
    default: false
notes:
  - Changing the Stratum-0 URL or the upstream of an existing repository is not supported; remove the repository
    first (O(state=absent)) if that is really wanted.
seealso:
  - module: infn_cloud.cvmfs_publisher.vault_repository_keys
  - name: CernVM-FS repository gateway and publishers
    description: How a gateway publisher is set up.
    link: https://cvmfs.readthedocs.io/en/stable/cpt-repository-gateway.html
  - name: cvmfs_server mkfs and rmfs
    description: Creating and removing repositories.
    link: https://cvmfs.readthedocs.io/en/stable/cpt-repo.html
"""

EXAMPLES = r"""
- name: Create alice.infn.it as a gateway publisher
  infn_cloud.cvmfs_publisher.cvmfs_repository:
    repository: alice.infn.it
    stratum0_url: https://stratum0.example.org/cvmfs/alice.infn.it
    gateway_url: https://gateway.example.org:4929/api/v1
    owner: cvmfs

- name: Remove it but keep its keys
  infn_cloud.cvmfs_publisher.cvmfs_repository:
    repository: alice.infn.it
    state: absent
    keep_keys: true
"""

RETURN = r"""
repository:
  description: The repository after the run (in check mode, as predicted).
  returned: always
  type: dict
  contains:
    name:
      description: Fully qualified name.
      type: str
      sample: alice.infn.it
    exists:
      description: Whether the repository exists.
      type: bool
    stratum0:
      description: C(CVMFS_STRATUM0) from server.conf.
      type: str
      sample: https://stratum0.example.org/cvmfs/alice.infn.it
    upstream:
      description: C(CVMFS_UPSTREAM_STORAGE) from server.conf.
      type: str
      sample: gw,/srv/cvmfs/alice.infn.it/data/txn,https://gateway.example.org:4929/api/v1
    owner:
      description: C(CVMFS_USER) from server.conf.
      type: str
      sample: cvmfs
    in_transaction:
      description: Whether a transaction is open (the spool holds C(in_transaction.lock)).
      type: bool
command:
  description: The C(cvmfs_server) command that was run (or would be, in check mode).
  returned: when changed
  type: str
  sample: cvmfs_server rmfs -f alice.infn.it
repaired:
  description: What a half-created repository lacked (its keys in C(/etc/cvmfs/keys), spool, union folder) before
    it was removed and created again.
  returned: when a half-created repository was found
  type: list
  elements: str
"""

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _cvmfs as cvmfs
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _cvmfs_keys as keys
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._cvmfs_repository import ensure_repository
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._module import PublisherModule

ARGUMENT_SPEC = dict(
    repository=dict(type="str", required=True, aliases=["fqrn", "name"]),
    state=dict(type="str", default="present", choices=["present", "absent"]),
    stratum0_url=dict(type="str"),
    gateway_url=dict(type="str"),
    txn_dir=dict(type="str"),
    owner=dict(type="str"),
    keep_keys=dict(type="bool", default=False, no_log=False),
)


def main():
    module = PublisherModule(
        ARGUMENT_SPEC,
        batch=True,
        option_sets=(cvmfs.CVMFS_ARGSPEC, keys.KEYS_DIR_ARGSPEC),
        required_if=[["state", "present", ["stratum0_url", "gateway_url"]]],
    )
    module.run(lambda module: ensure_repository(cvmfs.CvmfsServer.for_module(module), module.params,
                                                module.check_mode))


if __name__ == "__main__":
    main()
