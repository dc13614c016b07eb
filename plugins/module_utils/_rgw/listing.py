# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""One ListObjectsV2 answer (``encoding-type=url``) read into Observations, sub-folders and where the next page
starts.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.

Reading a listing is the CPU cost of a reconcile: ElementTree builds seven elements per key, and the listing threads
then wait on the GIL rather than on RGW (100,000 keys: 2.5 s of CPU for 3.1 s of listing). A page in the plain form
RGW and S3 write is read with regular expressions instead, in about half the CPU: each Contents in the order they
write (Key, LastModified, ETag, checksums, Size, StorageClass, Type; nothing nested), and the rest of the document
checked against a small grammar (the root with its namespace, simple elements, no attribute, namespace prefix,
comment, CDATA, DOCTYPE, processing instruction, character reference or character XML forbids, nothing after the
root, UTF-8). Anything else, and every page with CommonPrefixes, goes to ElementTree, which stays the reference:
the unit tests check with hypothesis that the fast reader either reads a generated page exactly as ElementTree does
or leaves it to ElementTree, also with markup slipped in anywhere.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import re
from xml.etree import ElementTree
from xml.sax.saxutils import unescape

try:
    from urllib.parse import unquote_plus
except ImportError:  # pragma: no cover - Python 2 module machinery only
    from urllib import unquote_plus  # noqa

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _sync_plan as sp

S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"

# The plain form. Element text: no markup, only the predefined entities, no character XML 1.0 forbids, no carriage
# return (XML folds it into a newline).
_CHARS = "[^<&\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\r\\ufffe\\uffff]*"
_TEXT = "%s(?:&(?:amp|lt|gt|quot|apos);%s)*" % (_CHARS, _CHARS)
# A Contents as RGW and S3 write it: Key, (LastModified,) ETag, (checksum,) Size, (StorageClass, Type), in that order
# (an Owner, or anything else, and the page goes to ElementTree).
_CONTENTS = re.compile(
    "<Contents><Key>(%(t)s)</Key>(?:<LastModified>%(t)s</LastModified>)?<ETag>(%(t)s)</ETag>"
    "(?:<ChecksumAlgorithm>%(t)s</ChecksumAlgorithm>)*(?:<ChecksumType>%(t)s</ChecksumType>)?<Size>([0-9]+)</Size>"
    "(?:<StorageClass>%(t)s</StorageClass>)?(?:<Type>%(t)s</Type>)?</Contents>" % {"t": _TEXT})
# The rest of the page, each Contents replaced by a NUL (which no text may hold): the root holds those, IsTruncated,
# NextContinuationToken and simple elements. No attribute, namespace prefix, comment, CDATA, DOCTYPE or processing
# instruction, nothing after the root.
_READ = ("Contents", "Key", "ETag", "Size", "IsTruncated", "NextContinuationToken")
_REST = re.compile(
    "(?:<\\?xml version=([\"'])1\\.0\\1(?: encoding=([\"'])(?i:utf-8)\\2)?(?: standalone=([\"'])(?:yes|no)\\3)?"
    "[ \\t\\n]*\\?>)?[ \\t\\n]*<ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">"
    "(?:\\x00|<IsTruncated>(?:true|false)</IsTruncated>|<NextContinuationToken>%(t)s</NextContinuationToken>"
    "|<(?!(?:%(read)s)>)(?P<name>[A-Za-z_][A-Za-z0-9_.-]*)>%(t)s</(?P=name)>|[ \\t\\n])*"
    "</ListBucketResult>[ \\t\\n]*" % {"t": _TEXT, "read": "|".join(_READ)})
_REST_FIELDS = re.compile("<IsTruncated>(true|false)</IsTruncated>|<NextContinuationToken>(%s)</NextContinuationToken>"
                          % _TEXT)
_QUOTES = {"&quot;": '"', "&apos;": "'"}   # saxutils.unescape knows &lt; &gt; &amp; (the last one last)


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
    return unescape(text, _QUOTES) if "&" in text else text


def read_page(body):
    """The ListingPage of a ListObjectsV2 answer (bytes); ElementTree.ParseError when it is not XML."""
    try:
        page = _read_plain(body.decode("utf-8"))
    except UnicodeDecodeError:
        page = None
    return page if page is not None else _read_tree(ElementTree.fromstring(body))


def _read_plain(text):
    """The page read with regular expressions, or None when it is not in the plain form they read exactly."""
    if "]]>" in text:   # not well-formed: ElementTree says so
        return None
    pieces = _CONTENTS.split(text)   # [rest, key, etag, size, rest, key, etag, size, ..., rest]
    rest = "\x00".join(pieces[::4])
    if len(pieces) < 5 or not _REST.fullmatch(rest):
        return None
    truncated, token = [], []
    for flag, value in _REST_FIELDS.findall(rest):
        (truncated if flag else token).append(flag or value)
    if len(truncated) != 1 or len(token) > 1:
        return None
    observations = [sp.Observation(decode_key(_unescape(key)), _unescape(etag), int(size))
                    for key, etag, size in zip(pieces[1::4], pieces[2::4], pieces[3::4])]
    return ListingPage(observations, [], truncated[0] == "true", _unescape(token[0]) if token else None)


def _read_tree(root):
    """The page read by ElementTree (any well-formed answer)."""
    observations = [sp.Observation(decode_key(item.findtext(S3_NS + "Key")), item.findtext(S3_NS + "ETag"),
                                   int(item.findtext(S3_NS + "Size"))) for item in root.iter(S3_NS + "Contents")]
    folders = [decode_key(item.findtext(S3_NS + "Prefix")) for item in root.iter(S3_NS + "CommonPrefixes")]
    return ListingPage(observations, folders, root.findtext(S3_NS + "IsTruncated") == "true",
                       root.findtext(S3_NS + "NextContinuationToken"))
