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
        called once with them; the elements share one connection to the service (one client, one login).
      - An element's option replaces the same option given beside O(batch), under any of its aliases, and the
        options it is mutually exclusive with (an element's C(*_file) over a task-level secret, for example).
        Options marked required, connection options included, may then be given in each element instead.
      - The result has C(results), one per element in order, each with the element as C(item), C(changed) and
        what the module returns for one object; a failed element has C(failed=true) and C(msg). One element's
        failure does not stop the others; the task then fails with a message that starts with C(<n> of <m> failed)
        and names every failed element with its own message.
      - With C(--diff), the elements' differences are shown one after another, each headed by its element's name.
      - Unlike a C(loop), the module starts once, not once per element.
    type: list
    elements: dict
"""
