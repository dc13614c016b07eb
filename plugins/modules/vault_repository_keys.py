#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: vault_repository_keys
short_description: Install a CVMFS repository's gateway keys from Vault
version_added: 0.1.0
description:
  - Logs in to Vault (or OpenBao) with a read-only AppRole, reads a repository's keys from a KV version 2 secret and
    installs them as C(<fqrn>.crt), C(<fqrn>.pub) and C(<fqrn>.gw) in the CVMFS keys folder, the three files a gateway
    publisher needs (see C(cvmfs_server mkfs -k)).
  - The secret is C(<subject>/cvmfs_keys/<fqrn>) for a personal repository or C(groups/<group>/cvmfs_keys/<fqrn>) for a
    group repository, with fields C(certificateKey) (the C(.crt)), C(publicKey) (the C(.pub)) and C(gatewayKey)
    (the C(.gw)).
  - Files get the modes C(cvmfs_server) gives them (C(.crt) and C(.pub) 0444, C(.gw) 0400). Only what differs is
    changed. A new content is written to a temporary file in the same folder, with its final mode and owner set before
    any byte is written, then renamed over the old file.
  - Key material never appears in the result, the diff or any message; the diff shows per file whether the content
    changed (with sha256 fingerprints), and mode or owner changes.
  - With O(state=absent) the three files are removed; Vault is not contacted.
author:
  - cvmfs-publisher developers (@infn-cloud)
requirements:
  - hvac
extends_documentation_fragment:
  - infn_cloud.cvmfs_publisher.vault
  - infn_cloud.cvmfs_publisher.cvmfs.keys
  - infn_cloud.cvmfs_publisher.batch
attributes:
  check_mode:
    support: full
    description: Reads Vault and the files and reports what would change; writes nothing.
  diff_mode:
    support: full
    description: Per file, before and after of existence, mode and sha256 fingerprint; never the content.
  action_group:
    support: full
    description: >-
      Use C(group/infn_cloud.cvmfs_publisher.vault) or C(group/infn_cloud.cvmfs_publisher.all) in C(module_defaults)
      to set its connection options once.
    membership:
      - infn_cloud.cvmfs_publisher.vault
      - infn_cloud.cvmfs_publisher.all
options:
  repository:
    description:
      - Fully qualified name of the repository, for example C(alice.infn.it).
    type: str
    required: true
    aliases: [fqrn]
  subject:
    description:
      - Subject (OIDC C(sub)) of the owner of a personal repository; the keys are read from
        C(<subject>/cvmfs_keys/<fqrn>).
      - Exactly one of O(subject) or O(group) is required with O(state=present).
    type: str
  group:
    description:
      - Group of a group repository; the keys are read from C(groups/<group>/cvmfs_keys/<fqrn>).
    type: str
  owner:
    description:
      - User (name or uid) that owns the key files, normally the repository owner given to C(cvmfs_server mkfs -o).
      - When unset, new files belong to the user running the module and the owner of existing files is left alone.
    type: str
  file_group:
    description:
      - Group (name or gid) of the key files. When unset, as for O(owner).
    type: str
  state:
    description:
      - V(present) installs the keys from Vault; V(absent) removes the three key files.
    type: str
    choices: [present, absent]
    default: present
notes:
  - Needs read access (C(read) capability on C(<kv_mount>/data/...)) for the AppRole, nothing more.
  - The login token is revoked at the end of the run.
seealso:
  - module: infn_cloud.cvmfs_publisher.cvmfs_repository
  - name: CernVM-FS repository gateway
    description: How a gateway publisher uses the .crt, .pub and .gw keys.
    link: https://cvmfs.readthedocs.io/en/stable/cpt-repository-gateway.html
  - name: Vault AppRole auth method
    description: The read-only login the module uses.
    link: https://developer.hashicorp.com/vault/docs/auth/approle
"""

EXAMPLES = r"""
- name: Install the keys of a personal repository
  infn_cloud.cvmfs_publisher.vault_repository_keys:
    url: https://vault.example.org:8200
    role_id_file: /etc/cvmfs-publisher/vault-role-id
    secret_id_file: /etc/cvmfs-publisher/vault-secret-id
    repository: alice.infn.it
    subject: 0d4f7e3a-5a4e-4c89-9e5b-1f3f6b2f2a11
    owner: cvmfs

- name: Install the keys of a group repository, connection options set once for the vault group
  module_defaults:
    group/infn_cloud.cvmfs_publisher.vault:
      url: https://vault.example.org:8200
      ca_cert: /etc/pki/tls/certs/vault-ca.pem
      role_id_file: /etc/cvmfs-publisher/vault-role-id
      secret_id_file: /etc/cvmfs-publisher/vault-secret-id
  block:
    - name: Keys of atlas.infn.it
      infn_cloud.cvmfs_publisher.vault_repository_keys:
        repository: atlas.infn.it
        group: atlas
        owner: cvmfs

- name: Remove the key files of a repository
  infn_cloud.cvmfs_publisher.vault_repository_keys:
    repository: alice.infn.it
    state: absent
"""

RETURN = r"""
path:
  description: The KV v2 secret the keys were read from, as C(<kv_mount>/<path>). Not returned with O(state=absent).
  returned: when O(state=present)
  type: str
  sample: secrets/0d4f7e3a-5a4e-4c89-9e5b-1f3f6b2f2a11/cvmfs_keys/alice.infn.it
files:
  description: The three key files.
  returned: always
  type: list
  elements: dict
  contains:
    path:
      description: Path of the file.
      type: str
      sample: /etc/cvmfs/keys/alice.infn.it.gw
    mode:
      description: Mode the file has (or would have) after the run; V(null) once removed.
      type: str
      sample: "0400"
    changed:
      description: Whether this file was (or, in check mode, would be) written, changed or removed.
      type: bool
    changes:
      description: What changed, for example V(created), V(content changed), V(mode 0644 -> 0400), V(removed).
      type: list
      elements: str
  sample:
    - {path: /etc/cvmfs/keys/alice.infn.it.crt, mode: "0444", changed: false, changes: []}
    - {path: /etc/cvmfs/keys/alice.infn.it.pub, mode: "0444", changed: false, changes: []}
    - {path: /etc/cvmfs/keys/alice.infn.it.gw, mode: "0400", changed: true, changes: [content changed]}
"""

from ansible.module_utils.basic import missing_required_lib
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _cvmfs_keys as keys
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _vault as vault
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._module import PublisherError, PublisherModule

ARGUMENT_SPEC = dict(
    repository=dict(type="str", required=True, aliases=["fqrn"]),
    subject=dict(type="str"),
    group=dict(type="str"),
    owner=dict(type="str"),
    file_group=dict(type="str"),
    state=dict(type="str", default="present", choices=["present", "absent"]),
)


def run(module):
    if module.params["state"] == "present" and not vault.HAS_HVAC:
        raise PublisherError(missing_required_lib("hvac"))

    def read_material(params, fqrn, fields):
        return vault.read_repository_keys(module.client(vault.VaultClient.login), params, fqrn, fields)

    return keys.ensure_keys(module.params, module.check_mode, read_material)


def main():
    module = PublisherModule(
        ARGUMENT_SPEC,
        batch=True,
        option_sets=(vault.VAULT_ARGSPEC, keys.KEYS_DIR_ARGSPEC),
        mutually_exclusive=vault.VAULT_MUTUALLY_EXCLUSIVE + [["subject", "group"]],
        required_if=[["state", "present", ["subject", "group"], True]],
    )
    module.run(run)


if __name__ == "__main__":
    main()
