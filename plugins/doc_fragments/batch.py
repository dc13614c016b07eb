# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""The ``batch`` option of the provisioning modules (module_utils/_module.py PublisherModule.run_batch)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):

    DOCUMENTATION = r"""
options:
  batch:
    description:
      - Apply the module to many objects in one module process, for example every repository of a host
        (C(playbooks/converge_repositories.yml) does). Each element is a dictionary of this module's options,
        merged over the options given beside O(batch), and is checked and applied as if the module had been
        called once with them; the items share one connection (one client, one login) to the service.
      - Options marked required may then be given in each element instead.
      - The result has C(results), one per element in order, each with the element as C(item), C(changed) and
        what the module returns for one object; a failed element has C(failed=true) and C(msg). One element's
        failure does not stop the others; the task then fails with a message naming every failed element.
      - With C(--diff), the elements' differences are shown one after another.
      - Unlike a C(loop), the module starts once, not once per element.
    type: list
    elements: dict
"""
