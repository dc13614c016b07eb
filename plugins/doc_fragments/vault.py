# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    # Connection and AppRole options of every module that reads Vault (module_utils/_vault.py VAULT_ARGSPEC).
    DOCUMENTATION = r"""
options:
  url:
    description:
      - URL of the Vault (or OpenBao) server, for example C(https://vault.example.org:8200).
      - If not set, the E(VAULT_ADDR) environment variable is used.
    type: str
  ca_cert:
    description:
      - Path to a PEM CA bundle that signs the Vault server's certificate.
      - If not set, the E(VAULT_CACERT) environment variable is used, then the system trust store.
    type: path
  validate_certs:
    description:
      - Whether to verify the Vault server's TLS certificate. Only turn off for testing.
    type: bool
    default: true
  timeout:
    description:
      - Seconds to wait for each request to Vault.
    type: int
    default: 30
  role_id:
    description:
      - AppRole role_id. Mutually exclusive with O(role_id_file); one of them is required.
    type: str
  role_id_file:
    description:
      - Path to a file holding the AppRole role_id.
    type: path
  secret_id:
    description:
      - AppRole secret_id. Prefer O(secret_id_file), which keeps it out of playbooks and process listings.
      - Mutually exclusive with O(secret_id_file). Omit both only for a role with C(bind_secret_id=false).
    type: str
  secret_id_file:
    description:
      - Path to a file holding the AppRole secret_id.
    type: path
  approle_mount_point:
    description:
      - Mount point of the AppRole auth method.
    type: str
    default: approle
  kv_mount:
    description:
      - Mount point of the KV version 2 secrets engine holding the repository keys.
    type: str
    default: secrets
"""
