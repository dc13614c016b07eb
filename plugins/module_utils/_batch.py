# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""The items of a module's ``batch`` option (``PublisherModule(..., batch=True)``, _module.py).

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.

Each item is merged over the task's other options and checked against the module's whole argument spec, as if
the module had been called once with it:

- options are merged by their canonical names, so an alias on one side and the name on the other do not both
  count (ansible would take the alias);
- an item's option replaces the task-level options it is mutually exclusive with (an item's ``secret_key_file``
  over the task's ``secret_key``, an item's ``group`` over the task's ``subject``);
- every item is checked when the module starts, before anything is logged or returned, so the secrets of every
  item (no_log options, and what the module's ``secrets_of`` finds, e.g. a broker password in a URL) are masked
  in the module's log line and in every result, also when an item or the task fails its checks.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible.module_utils.common.arg_spec import ModuleArgumentSpecValidator
from ansible.module_utils.errors import UnsupportedError

# The constraints AnsibleModule checks across options; with ``batch`` they are checked on each merged option set.
CONSTRAINTS = ("mutually_exclusive", "required_together", "required_one_of", "required_if", "required_by")


def relaxed(spec):
    """``spec`` with no option required (a batch's items may supply them; each merged item is checked in full)."""
    return dict((name, dict(option, required=False)) for name, option in spec.items())


def task_options(raw):
    """The options the task gave beside ``batch`` (no ansible-internal ones)."""
    return dict((name, value) for name, value in raw.items() if name != "batch" and not name.startswith("_ansible_"))


def found_secrets(secrets_of, params):
    """The values ``secrets_of(params)`` finds to mask (none without ``secrets_of``; empty ones left out)."""
    return set(value for value in (secrets_of(params) if secrets_of is not None else ()) if value)


class Item:
    """One element of the batch: as given (``given``), its merged and checked options, or its errors."""

    def __init__(self, given, validation, label):
        self.given = given
        self.params = validation.validated_parameters
        self.label = label
        self.errors = "; ".join(("unsupported option " if isinstance(error, UnsupportedError) else "")
                                + str(error.args[0]) for error in validation.errors.errors)


class Batch:
    def __init__(self, items, task, spec, constraints, label, secrets_of=None):
        """``items`` (the raw ``batch``), ``task`` (the task's other raw options), the module's whole ``spec`` and
        cross-option ``constraints``; ``label`` names an item in messages; ``secrets_of(params)`` yields values
        to mask that no option's no_log covers."""
        self.aliases = dict((alias, name) for name, option in spec.items() for alias in option.get("aliases") or ())
        self.exclusive = constraints.get("mutually_exclusive") or []
        self.secrets = set()
        self.task = self._canonical(task)
        self.secrets.update(found_secrets(secrets_of, self.task))
        validator = ModuleArgumentSpecValidator(spec, **constraints)
        self.items = []
        for given in items if isinstance(items, list) else []:
            if not isinstance(given, dict):
                continue  # the task-level check of ``batch`` (a list of dicts) refuses it
            validation = validator.validate(self.merged(given))
            self.secrets.update(validation._no_log_values)  # pylint: disable=protected-access  # no public name
            self.secrets.update(found_secrets(secrets_of, validation.validated_parameters))
            name = validation.validated_parameters.get(label) or self._canonical(given).get(label)
            self.items.append(Item(given, validation, name))

    def _canonical(self, options):
        return dict((self.aliases.get(name, name), value) for name, value in options.items())

    def merged(self, item):
        """The task's options with ``item``'s over them (canonical names); an item's option drops the task's
        options it is mutually exclusive with."""
        item = self._canonical(item)
        task = dict(self.task)
        for group in self.exclusive:
            if any(name in item for name in group):
                for name in group:
                    if name not in item:
                        task.pop(name, None)
        return dict(task, **item)
