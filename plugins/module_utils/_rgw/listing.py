# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""One ListObjectsV2 answer (``encoding-type=url``) read into Observations, sub-folders and where the next page
starts.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.

Reading a listing is the CPU cost of a reconcile: ElementTree builds seven elements per key, about 9 ms of CPU for a
1,000-key page, and the listing threads then wait on the GIL rather than on RGW (100,000 keys: 2.3 s of CPU for
2.6 s of listing). A page in the plain form S3 and RGW write (no CDATA, no character references, one Key, ETag and
Size per Contents, the document complete) is read with four regular expressions instead, 1.9 ms for the same page;
anything else, and every page with CommonPrefixes, goes to ElementTree, which stays the reference: the unit tests
check that both read every generated page the same.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import re
from xml.etree import ElementTree

try:
    from urllib.parse import unquote_plus
except ImportError:  # pragma: no cover - Python 2 module machinery only
    from urllib import unquote_plus  # noqa

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _sync_plan as sp

S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"

_TEXT = "([^<&]*(?:&(?:amp|lt|gt|quot|apos);[^<&]*)*)"   # element text with only the predefined entities
_FIELDS = tuple((name, re.compile(pattern % {"name": name, "text": _TEXT})) for name, pattern in (
    ("Key", "<%(name)s>%(text)s</%(name)s>"),
    ("ETag", "<%(name)s>%(text)s</%(name)s>"),
    ("Size", "<%(name)s>([0-9]+)</%(name)s>"),
    ("IsTruncated", "<%(name)s>(true|false)</%(name)s>"),
    ("NextContinuationToken", "<%(name)s>%(text)s</%(name)s>"),
))
# An element of those names that is empty, self-closing or has attributes.
_IRREGULAR = re.compile("<(?:Contents|%s)[\\s/]" % "|".join(name for name, pattern in _FIELDS))
_NAMESPACE = '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
_NAMESPACE_WITHIN = 200
# CDATA, character references, comments and carriage returns (which XML folds) are read by ElementTree, and so is a
# page with folders (CommonPrefixes): the few delimiter listings of a run.
_NOT_PLAIN = ("<![CDATA[", "&#", "<!--", "\r", "<CommonPrefixes")
_ENTITIES = (("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&apos;", "'"), ("&amp;", "&"))


class ListingPage:
    """What one page says: ``observations`` (Observations, keys decoded), ``folders`` (CommonPrefixes, decoded),
    ``truncated`` and the ``token`` of the next page."""

    __slots__ = ("observations", "folders", "truncated", "token")

    def __init__(self, observations, folders, truncated, token):
        self.observations, self.folders, self.truncated, self.token = observations, folders, truncated, token


def decode_key(text):
    """A key as ``encoding-type=url`` sends it, decoded (``unquote_plus``; the common "%2F" without its cost)."""
    text = text.replace("%2F", "/")
    return unquote_plus(text) if "%" in text or "+" in text else text


def _unescape(text):
    if "&" not in text:
        return text
    for entity, char in _ENTITIES:   # "&amp;" last: "&amp;lt;" is "&lt;", not "<"
        text = text.replace(entity, char)
    return text


def read_page(body):
    """The ListingPage of a ListObjectsV2 answer (bytes); ElementTree.ParseError when it is not XML."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    page = _read_plain(text) if text is not None else None
    return page if page is not None else _read_tree(ElementTree.fromstring(body))


def _read_plain(text):
    """The page read with regular expressions, or None when it is not in the plain form they can read exactly."""
    if not text.rstrip().endswith("</ListBucketResult>") or _NAMESPACE not in text[:_NAMESPACE_WITHIN] \
            or any(mark in text for mark in _NOT_PLAIN) or _IRREGULAR.search(text):
        return None
    found = dict((name, pattern.findall(text)) for name, pattern in _FIELDS)
    # Every element of each name read by its pattern (its text had nothing else), one Key, ETag and Size per
    # Contents, and at least one Contents.
    if any(len(values) != text.count("<%s>" % name) for name, values in found.items()) \
            or not (len(found["Key"]) == len(found["ETag"]) == len(found["Size"]) == text.count("<Contents>") > 0) \
            or len(found["IsTruncated"]) != 1 or len(found["NextContinuationToken"]) > 1:
        return None
    keys, etags, sizes, token = found["Key"], found["ETag"], found["Size"], found["NextContinuationToken"]
    observations = [sp.Observation(decode_key(_unescape(key)), _unescape(etag), int(size))
                    for key, etag, size in zip(keys, etags, sizes)]
    return ListingPage(observations, [], found["IsTruncated"][0] == "true", _unescape(token[0]) if token else None)


def _read_tree(root):
    """The page read by ElementTree (any well-formed answer)."""
    observations = [sp.Observation(decode_key(item.findtext(S3_NS + "Key")), item.findtext(S3_NS + "ETag"),
                                   int(item.findtext(S3_NS + "Size"))) for item in root.iter(S3_NS + "Contents")]
    folders = [decode_key(item.findtext(S3_NS + "Prefix")) for item in root.iter(S3_NS + "CommonPrefixes")]
    return ListingPage(observations, folders, root.findtext(S3_NS + "IsTruncated") == "true",
                       root.findtext(S3_NS + "NextContinuationToken"))
