# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""The vault_repository_keys module, with the lasting AnsiballZ payload cache of plugin_utils/_ansiballz_cache.py."""

from __future__ import annotations

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.plugin_utils._ansiballz_cache import CachedPayloadAction


class ActionModule(CachedPayloadAction):
    pass
