# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""Reading RGW's XML answers where the collection sends its own requests (``_rgw/sns.py``,
``_rgw/notification.py``): elements found by their local name, whatever the namespace (RGW's S3 answers carry
S3's, its SNS answers SNS's), and an answer that is not the XML document expected reported as a ClientError.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from xml.etree import ElementTree

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw.client import ClientError


def parse(content, operation, root_name):
    """The root element, called ``root_name``, of a successful answer to ``operation``. Anything else (not XML,
    or another document: a login page of a proxy in front of RGW) is a ClientError, code MalformedAnswer, not
    retried, that the callers report as any other RGW failure: botocore raised a bare ResponseParserError."""
    try:
        root = ElementTree.fromstring(content)
    except ElementTree.ParseError as exc:
        raise malformed(operation, "the answer is not XML (%s)" % exc)
    found = local_name(root.tag)
    if found != root_name:
        raise malformed(operation, "the answer is a <%s> document, not RGW's <%s>" % (found, root_name))
    return root


def malformed(operation, message):
    return ClientError({"Error": {"Code": "MalformedAnswer", "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": 200}}, operation)


def local_name(tag):
    return tag.rsplit("}", 1)[-1]


def children(element, name):
    """The children of ``element`` (None: none) called ``name``, in any namespace."""
    return [child for child in element if local_name(child.tag) == name] if element is not None else []


def text(element, name):
    """The text of the first child called ``name`` ('' when it is empty or there is none)."""
    found = children(element, name)
    return (found[0].text or "") if found else ""
