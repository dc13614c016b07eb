# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""Filters that turn a list of repository requests into the ``batch`` of each provisioning module (the repository
role's present.yml); their documentation is in repository_requests.yml, batch_items.yml and succeeded.yml."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible.errors import AnsibleFilterError
from ansible.module_utils.common.text.converters import to_text
from ansible.module_utils.six import string_types
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._naming import InvalidName, short_name

_FIELDS = ("repository", "subject", "group")


def repository_requests(requests):
    """[{repository, subject | group}] -> [{repository, subject, group, short}] ('' for what is not set). A name no
    module accepts gets an empty ``short``: the first module refuses it with its own message, for that entry only."""
    if not isinstance(requests, (list, tuple)):
        raise AnsibleFilterError("repository_requests expects a list of {repository, subject | group} entries")
    normalized = []
    for index, request in enumerate(requests):
        if not isinstance(request, dict) or not isinstance(request.get("repository"), string_types):
            raise AnsibleFilterError("repository request %d has no repository name: %r" % (index + 1, request))
        entry = dict((field, to_text(request.get(field) or "")) for field in _FIELDS)
        try:
            entry["short"] = short_name(entry["repository"])
        except InvalidName:
            entry["short"] = ""
        normalized.append(entry)
    return normalized


def batch_items(requests, **templates):
    """One ``batch`` element per request: each option's template filled in with the request's fields
    (``'{short}'``, ``'https://s0/{repository}'``); an option whose text comes out empty is left out, a value that
    is not text is passed as it is."""
    items = []
    for request in requests:
        item = {}
        for option, template in templates.items():
            if isinstance(template, string_types):
                try:
                    template = template.format(**request)
                except (KeyError, IndexError, ValueError) as exc:
                    raise AnsibleFilterError("batch_items: cannot fill in %s=%r: %s" % (option, template, exc))
                if not template:
                    continue
            item[option] = template
        items.append(item)
    return items


def succeeded(requests, step):
    """The requests whose element of a batch step's registered result did not fail (all of them when the step
    did not run in batch form, none when the whole step failed without results)."""
    if not isinstance(step, dict) or step.get("skipped"):
        return list(requests)
    results = step.get("results")
    if results is None:
        return [] if step.get("failed") else list(requests)
    return [request for request, result in zip(requests, results) if not result.get("failed")]


class FilterModule:
    def filters(self):
        return {"repository_requests": repository_requests, "batch_items": batch_items, "succeeded": succeeded}
