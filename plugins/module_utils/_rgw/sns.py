# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""RGW's SNS API (topics), the four calls ``rgw_topic`` makes, as botocore's SNS client makes them: a POST of the
query protocol's form (``Action=...&Version=2010-03-31&...``), signed with SigV4 for service ``sns``
(``Connection.signed_request``), and the parts of the XML answer the module reads.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.

Why not boto3's SNS client: its session and service model are about 0.2 s of every ``rgw_topic`` run, for four
small calls. An error answer is a ClientError (``client.client_error_from_http``); a transient failure (throttling,
5xx, a dropped connection) is tried again with backoff, as botocore's standard retries did.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

try:
    from urllib.parse import quote
except ImportError:  # pragma: no cover - Python 2 module machinery only
    from urllib import quote  # noqa

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw import answers
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw.client import retried_request

API_VERSION = "2010-03-31"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded; charset=utf-8"  # botocore's, for the query protocol
RESULTS = frozenset(["ListTopics", "GetTopicAttributes", "CreateTopic"])  # the actions whose answer has a Result


def form(action, fields):
    """The query protocol's body: ``Action``, ``Version``, then the fields in order, percent-encoded (only ``-_.~``
    left as they are). A space is ``%20``: botocore sent ``+``, which RGW 16.2 keeps as a ``+``."""
    pairs = [("Action", action), ("Version", API_VERSION)] + list(fields)
    return "&".join("%s=%s" % (quote(name, safe="-_.~"), quote(value, safe="-_.~"))
                    for name, value in pairs).encode("utf-8")


def attribute_fields(attributes):
    """An ``Attributes`` map as the query protocol flattens it: ``Attributes.entry.N.key`` and ``.value``."""
    fields = []
    for number, (key, value) in enumerate(attributes.items(), 1):
        fields += [("Attributes.entry.%d.key" % number, key), ("Attributes.entry.%d.value" % number, value)]
    return fields


def _result(content, action):
    """The ``<{action}Result>`` of an answer (``<{action}Response><{action}Result>``); None for an action without
    one (DeleteTopic)."""
    root = answers.parse(content, action, action + "Response")
    found = answers.children(root, action + "Result")
    if found:
        return found[0]
    if action in RESULTS:
        raise answers.malformed(action, "the answer has no <%sResult>" % action)
    return None


@retried_request
def call(rgw, action, fields=()):
    """POST one action to the endpoint; the ``<{action}Result>`` of its answer. Errors are ClientErrors named
    ``action`` (what ``client.OPERATION_RIGHTS`` knows them by)."""
    content = rgw.signed_request("POST", rgw.endpoint_url.rstrip("/") + "/", action, body=form(action, fields),
                                 content_type=FORM_CONTENT_TYPE, service="sns").content
    return _result(content, action)


def list_topics(rgw, next_token=None):
    """One page of ListTopics: (the topics' ARNs, the next page's token or None)."""
    result = call(rgw, "ListTopics", [("NextToken", next_token)] if next_token else [])
    members = [member for topics in answers.children(result, "Topics")
               for member in answers.children(topics, "member")]
    return [answers.text(member, "TopicArn") for member in members], answers.text(result, "NextToken") or None


def get_topic_attributes(rgw, arn):
    """GetTopicAttributes: the topic's ``Attributes`` ({key: value})."""
    result = call(rgw, "GetTopicAttributes", [("TopicArn", arn)])
    entries = [entry for attributes in answers.children(result, "Attributes")
               for entry in answers.children(attributes, "entry")]
    return dict((answers.text(entry, "key"), answers.text(entry, "value")) for entry in entries)


def create_topic(rgw, name, attributes):
    """CreateTopic (RGW overwrites a topic of that name with these ``attributes``): the topic's ARN."""
    arn = answers.text(call(rgw, "CreateTopic", [("Name", name)] + attribute_fields(attributes)), "TopicArn")
    if not arn:
        raise answers.malformed("CreateTopic", "the answer names no TopicArn")
    return arn


def delete_topic(rgw, arn):
    call(rgw, "DeleteTopic", [("TopicArn", arn)])
