# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
name: short_name
short_description: The short name of a CVMFS repository (its bucket, topic, queue and routing key)
version_added: 0.2.0
description:
  - C(alice.infn.it) gives C(alice), after checking that the fully qualified name is one CVMFS, S3, RGW and
    RabbitMQ accept. The same rule the modules and the consumer daemon use.
author:
  - cvmfs-publisher developers (@infn-cloud)
options:
  _input:
    description: Fully qualified repository name, C(<name>.<domain>).
    type: str
    required: true
"""

EXAMPLES = r"""
- name: The bucket of a repository
  ansible.builtin.debug:
    msg: "{{ 'alice.infn.it' | infn_cloud.cvmfs_publisher.short_name }}"  # alice
"""

RETURN = r"""
_value:
  description: The short name.
  type: str
"""

from ansible.errors import AnsibleFilterError
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._naming import InvalidName, short_name


def repository_short_name(fqrn):
    try:
        return short_name(fqrn)
    except InvalidName as exc:
        raise AnsibleFilterError(str(exc))


class FilterModule:
    def filters(self):
        return {"short_name": repository_short_name}
