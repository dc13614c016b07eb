# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""A bucket's objects as the sync engine reads them: listing, HeadObject, and streamed, checked download.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.

Listing and downloading skip boto3's response parsing: botocore's generic XML parser spends ~1 s of CPU per
1,000-key ListObjectsV2 page and ~2 ms per GetObject, which made the engine CPU-bound on small objects (a page is
read by ``_rgw/listing.py``). The
requests go through ``Connection.signed_request`` (the connection's own credentials, static or AssumeRole, and
TLS settings); errors become ClientErrors so messages and retries stay those of ``client``.

A whole prefix is listed as rclone lists it: listings with the "/" delimiter give the objects right under the
prefix and its folders (a level deeper while there are fewer folders than ``concurrency``), then each folder is listed
page by page in its own thread (``concurrency`` at once). A listing is one page after another; folders listed in
parallel keep RGW's cores busy.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from xml.etree import ElementTree

try:
    from urllib.parse import quote, urlencode
except ImportError:  # pragma: no cover - Python 2 module machinery only
    from urllib import quote, urlencode  # noqa

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _sync_plan as sp
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._module import PublisherError
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw import listing
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw.client import (
    BotoCoreError,
    ClientError,
    Connection,
    describe_client_error,
    error_code,
    error_status,
    retried_request,
)

CHUNK_BYTES = 1 << 20
# How many folder levels a parallel listing reads with the delimiter, looking for enough folders to list at once.
LIST_MAX_DEPTH = 3


class TransferError(PublisherError):
    """A listing, HeadObject or download that failed; ``details`` name the key when there is one."""


class ObjectGone(Exception):
    """The object disappeared between listing and download (or was an incomplete multipart upload)."""


def not_found(exc):
    return error_status(exc) == 404 or error_code(exc) in ("404", "NoSuchKey", "NotFound")


class BucketObjects:
    """The objects of one bucket. ``connect()`` makes the ``client.Connection`` on first use, so a run that
    stops before reading the bucket (a missing repository, check of a stale transaction) never connects."""

    def __init__(self, bucket, connect, concurrency=1):
        self.bucket = bucket
        self._connect = connect
        self._rgw = None
        self.concurrency = max(1, concurrency)

    @classmethod
    def from_params(cls, params, bucket, concurrency):
        """From the ``rgw`` options, with an HTTP pool sized for ``concurrency`` parallel transfers."""
        return cls(bucket, lambda: Connection(params, max_pool_connections=concurrency), concurrency)

    @property
    def rgw(self):
        if self._rgw is None:
            self._rgw = self._connect()
        return self._rgw

    def _url(self, key=None, query=None):
        url = "%s/%s" % (self.rgw.endpoint_url.rstrip("/"), quote(self.bucket, safe=""))
        if key is not None:
            url += "/" + quote(key, safe="/~")
        if query:
            url += "?" + urlencode(sorted(query.items()), quote_via=quote)
        return url

    # -- listing ---------------------------------------------------------------------------------------------------
    @retried_request
    def _list_page(self, prefix, token, delimiter=None):
        """One ListObjectsV2 answer, as bytes."""
        query = {"list-type": "2", "prefix": prefix, "encoding-type": "url", "max-keys": "1000"}
        if delimiter:
            query["delimiter"] = delimiter
        if token:
            query["continuation-token"] = token
        return self.rgw.signed_request("GET", self._url(query=query), "ListObjectsV2").content

    def _pages(self, prefix, delimiter=None):
        """The listing pages of ``prefix`` (``_rgw/listing.ListingPage``), one after another."""
        token = None
        where = "s3://%s/%s" % (self.bucket, prefix)
        while True:
            try:
                page = listing.read_page(self._list_page(prefix, token, delimiter))
            except (BotoCoreError, ClientError) as exc:
                raise TransferError(describe_client_error(exc, "list %s" % where))
            except ElementTree.ParseError as exc:
                raise TransferError("RGW answered the listing of %s with malformed XML: %s" % (where, exc))
            yield page
            token = page.token
            if not page.truncated or not token:
                return

    def _list_sequentially(self, prefix):
        for page in self._pages(prefix):
            yield from page.observations

    def _list_folder(self, prefix):
        """Everything under ``prefix``, page after page."""
        observations = []
        for page in self._pages(prefix):
            observations.extend(page.observations)
        return observations

    def _list_level(self, prefix):
        """(the objects right under ``prefix``, its sub-folders): a listing with the "/" delimiter."""
        observations, folders = [], []
        for page in self._pages(prefix, delimiter="/"):
            observations.extend(page.observations)
            folders.extend(page.folders)
        return observations, folders

    def list(self, prefix):
        """Every object under ``prefix`` as Observations, in no particular order. With ``concurrency`` 1 streamed
        page by page (1,000 keys a page). Else the first page decides: a prefix that fits in it (most repositories)
        is listed by that one request. A larger one: folder levels are read with the "/" delimiter (objects right
        under them, and their sub-folders) until there are at least ``concurrency`` folders (or LIST_MAX_DEPTH
        levels), then each of those folders is listed whole, page by page, ``concurrency`` at once."""
        if self.concurrency <= 1:
            yield from self._list_sequentially(prefix)
            return
        first = next(self._pages(prefix), None)   # _pages yields at least one page or raises
        if first is None:
            return
        if not first.truncated:
            yield from first.observations
            return
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            folders, depth = [prefix], 0
            while len(folders) < self.concurrency and depth < LIST_MAX_DEPTH:
                below = []
                for observations, subfolders in pool.map(self._list_level, folders):
                    yield from observations
                    below.extend(subfolders)
                folders, depth = below, depth + 1
            for observations in pool.map(self._list_folder, folders):
                yield from observations

    # -- HeadObject ------------------------------------------------------------------------------------------------
    @retried_request
    def _head(self, key):
        return self.rgw.signed_request("HEAD", self._url(key), "HeadObject").headers

    def head(self, keys, concurrency):
        """The current state of each key (absent ones with etag None), read in parallel, in the order given.
        Signed requests, not boto3's head_object: a one-key event run then never builds boto3's S3 client (loading
        its service model is a tenth of a second)."""
        def head(key):
            action = "read s3://%s/%s" % (self.bucket, key)
            try:
                reply = self._head(key)
            except ClientError as exc:
                if not_found(exc):
                    return sp.Observation(key, None, None)
                raise TransferError(describe_client_error(exc, action), key=key)
            except BotoCoreError as exc:
                raise TransferError(describe_client_error(exc, action), key=key)
            return sp.Observation(key, reply.get("ETag"), int(reply.get("Content-Length") or 0))

        keys = list(keys)
        if keys and self._rgw is None:
            self._rgw = self._connect()  # once, here: not by the threads, racing to make it
        with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(keys) or 1))) as pool:
            return list(pool.map(head, keys))

    # -- small writes --------------------------------------------------------------------------------------------
    @retried_request
    def _put(self, key, body, content_type):
        self.rgw.signed_request("PUT", self._url(key), "PutObject", body=body, content_type=content_type)

    def put(self, key, body, content_type="application/json"):
        """Write a small object (the uploader's report); TransferError when RGW refuses or cannot be reached."""
        if not isinstance(body, bytes):
            body = body.encode("utf-8")
        try:
            self._put(key, body, content_type)
        except (BotoCoreError, ClientError) as exc:
            raise TransferError(describe_client_error(exc, "write s3://%s/%s" % (self.bucket, key)), key=key)

    # -- download --------------------------------------------------------------------------------------------------
    @retried_request
    def _get(self, key):
        return self.rgw.signed_request("GET", self._url(key), "GetObject", stream=True)

    def download(self, change, folder):
        """Stream one object into a new file in ``folder`` and return its path; updates change.etag/size to what
        was actually read (the object may have been replaced since it was listed). Raises ObjectGone on 404,
        TransferError on other errors or a bad checksum."""
        action = "download s3://%s/%s" % (self.bucket, change.key)
        try:
            response = self._get(change.key)
        except ClientError as exc:
            if not_found(exc):
                raise ObjectGone(change.key)
            raise TransferError(describe_client_error(exc, action), key=change.key)
        except BotoCoreError as exc:
            raise TransferError(describe_client_error(exc, action), key=change.key)
        try:
            fd, path = tempfile.mkstemp(dir=folder, prefix="obj-")
        except OSError as exc:
            response.raw.close()
            raise TransferError("%s: cannot create a file in %s: %s" % (action, folder, exc.strerror or exc),
                                key=change.key)
        digest = hashlib.md5()
        size = 0
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb") as handle:
                for chunk in iter(lambda: response.raw.read(CHUNK_BYTES), b""):
                    digest.update(chunk)
                    handle.write(chunk)
                    size += len(chunk)
            response.raw.release_conn()
        except BaseException as exc:
            response.raw.close()
            os.unlink(path)
            if isinstance(exc, (OSError, BotoCoreError)) or type(exc).__module__.startswith("urllib3"):
                raise TransferError("%s: %s" % (action, exc), key=change.key)
            raise
        etag = sp.normalize_etag(response.headers.get("ETag"))
        announced = response.headers.get("Content-Length")
        wrong_md5 = sp.etag_is_md5(etag) and digest.hexdigest() != etag
        if (announced is not None and int(announced) != size) or wrong_md5:
            os.unlink(path)
            raise TransferError("download of s3://%s/%s was corrupted: got %d bytes with MD5 %s, RGW announced %s "
                                "bytes with ETag %s" % (self.bucket, change.key, size, digest.hexdigest(), announced,
                                                        etag), key=change.key)
        change.etag, change.size = etag, size
        return path
