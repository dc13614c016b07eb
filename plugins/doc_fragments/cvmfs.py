# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    # Options of every module that runs cvmfs_server (module_utils/_cvmfs.py CVMFS_ARGSPEC).
    DOCUMENTATION = r"""
options:
  cvmfs_server_bin:
    description:
      - The C(cvmfs_server) executable, a name looked up in E(PATH) or a path.
    type: str
    default: cvmfs_server
  cvmfs_root:
    description:
      - Prefix of every path C(cvmfs_server) uses (C(/etc/cvmfs), C(/var/spool/cvmfs), C(/cvmfs)) when the module
        reads them. Empty (the default) means the real paths.
      - Only the local development stack sets it, to the root of its C(cvmfs_server) stand-in.
    type: str
    default: ''
"""

    # The keys folder (module_utils/_cvmfs.py KEYS_DIR_ARGSPEC), shared by the modules that install and use keys.
    KEYS = r"""
options:
  keys_dir:
    description:
      - Folder holding the repository keys C(<fqrn>.crt), C(<fqrn>.pub) and C(<fqrn>.gw).
      - An actual path; C(cvmfs_root) is not prepended to it.
      - Defaults to C(/etc/cvmfs/keys) (under C(cvmfs_root) for modules that have that option), the folder
        C(cvmfs_server) uses; C(cvmfs_server mkfs) refuses to import keys from another folder when that one
        already holds some.
    type: path
"""
