# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""Signed requests to RGW over a small pool of keep-alive connections: the sync engine's hot path (listing pages,
HeadObject, and the GetObject of every changed object), and the few calls of the topic and bucket notification
modules (small XML or form bodies: ``_rgw/sns.py``, ``_rgw/notification.py``).

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.

Why not botocore's HTTP stack: one GetObject through botocore's AWSRequest, its SigV4 signer and urllib3 costs about
0.8 ms of CPU (some 1,800 Python calls), so copying many small objects was CPU-bound in Python. Here a request is
signed as botocore's ``S3SigV4Auth`` signs it (``tests/unit/test_rgw_transport.py`` checks that the signatures are
identical) and sent with the standard library's ``http.client``: about 0.45 ms a GetObject. For the modules the gain
is the start-up: a botocore session and its service models are about 0.2 s of each module run.

``client.Connection`` uses it for direct connections only; with a proxy or a client certificate it keeps botocore's
``URLLib3Session``. TLS is verified as botocore verifies it (only the CA bundle botocore would use, host names
checked). An idle connection the server has closed is skipped before reuse, and one that fails before its answer
is retried once on a new connection, as urllib3 does; every other failure is raised as botocore's own exception
(EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError, SSLError), so retries and
messages stay those of ``client``.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import collections
import datetime
import hashlib
import hmac
import os
import select
import ssl
import threading

try:
    import http.client as httplib
    from urllib.parse import urlsplit
except ImportError:  # pragma: no cover - Python 2 module machinery only
    import httplib  # noqa
    from urlparse import urlsplit  # noqa

try:
    from botocore import exceptions as bex
except ImportError:  # client.require_boto3 reports it before a Transport is made
    bex = None

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
SIGV4_TIMESTAMP = "%Y%m%dT%H%M%SZ"
USER_AGENT = "infn_cloud.cvmfs_publisher"
ERROR_BODY_LIMIT = 64 << 10  # an error answer is read this far (RGW's are a few hundred bytes)


# ---------------------------------------------------------------------------------------------------------------
# SigV4


class Credentials(collections.namedtuple("Credentials", "access_key secret_key token")):
    """Static keys, read as botocore's frozen credentials are."""
    __slots__ = ()

    def __repr__(self):  # never the secret
        return "Credentials(access_key=%r)" % (self.access_key,)


class Signer:
    """AWS Signature Version 4, exactly as botocore signs: ``S3SigV4Auth`` for S3 (the path signed as sent, since S3
    does not normalise it; the payload's hash sent in X-Amz-Content-SHA256 and signed), ``SigV4Auth`` for the other
    services (RGW's SNS API: a form body, its Content-Type signed). The query's ``key=value`` pairs are signed as
    sent, sorted. The day's signing key is kept for the next request."""

    def __init__(self, region, service="s3"):
        self.region = region
        self.service = service
        self._key = (None, None, None)  # (secret key, day, signing key)

    def _signing_key(self, secret_key, day):
        cached_secret, cached_day, key = self._key
        if cached_secret != secret_key or cached_day != day:
            key = ("AWS4" + secret_key).encode("utf-8")
            for part in (day, self.region, self.service, "aws4_request"):
                key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
            self._key = (secret_key, day, key)
        return key

    def headers(self, method, url, credentials, now=None, body=None, content_type=None):
        """The headers that sign ``method url`` (with ``body``, bytes, and its ``content_type``) with
        ``credentials`` (botocore's frozen credentials); the Content-Type is among them when given."""
        parts = urlsplit(url)
        stamp = (now or datetime.datetime.now(datetime.timezone.utc)).strftime(SIGV4_TIMESTAMP)
        day = stamp[:8]
        payload = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
        signed = [("content-type", " ".join(content_type.split()))] if content_type else []
        signed.append(("host", canonical_host(parts)))
        s3 = self.service == "s3"
        if s3:
            signed.append(("x-amz-content-sha256", payload))
        signed.append(("x-amz-date", stamp))
        if credentials.token:
            signed.append(("x-amz-security-token", " ".join(credentials.token.split())))
        names = ";".join(pair[0] for pair in signed)
        canonical = "\n".join([
            method.upper(), parts.path or "/", canonical_query(parts.query),
            "".join("%s:%s\n" % pair for pair in signed), names, payload])
        scope = "%s/%s/%s/aws4_request" % (day, self.region, self.service)
        to_sign = "AWS4-HMAC-SHA256\n%s\n%s\n%s" % (stamp, scope,
                                                    hashlib.sha256(canonical.encode("utf-8")).hexdigest())
        signature = hmac.new(self._signing_key(credentials.secret_key, day), to_sign.encode("utf-8"),
                             hashlib.sha256).hexdigest()
        headers = {"X-Amz-Date": stamp,
                   "Authorization": "AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (
                       credentials.access_key, scope, names, signature)}
        if s3:
            headers["X-Amz-Content-SHA256"] = payload
        if content_type:
            headers["Content-Type"] = content_type
        if credentials.token:
            headers["X-Amz-Security-Token"] = credentials.token
        return headers


def canonical_host(parts):
    """The Host header as botocore signs it: the URL's host and port, without the scheme's default port."""
    default = {"http": 80, "https": 443}.get(parts.scheme)
    host = parts.hostname or ""
    if ":" in host:
        host = "[%s]" % host  # an IPv6 literal
    return host if parts.port in (None, default) else "%s:%d" % (host, parts.port)


def canonical_query(query):
    """The query's pairs as sent, sorted (botocore's ``_canonical_query_string_url``)."""
    if not query:
        return ""
    pairs = sorted(pair.partition("=")[::2] for pair in query.split("&"))
    return "&".join("%s=%s" % pair for pair in pairs)


# ---------------------------------------------------------------------------------------------------------------
# Connections


def dropped(sock):
    """True when an idle keep-alive connection can no longer be used: its socket is readable while no request is
    in flight, so the server closed it (or sent what nobody asked for). urllib3's ``is_connection_dropped``."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


# How a keep-alive connection that the server closed while idle fails on its next request.
STALE = (httplib.RemoteDisconnected, ConnectionResetError, ConnectionAbortedError, BrokenPipeError, ssl.SSLEOFError,
         ssl.SSLZeroReturnError)


def default_ca_bundle():
    """botocore's default CA bundle (``botocore.httpsession.where``): certifi's when installed, else its own; without
    importing botocore.httpsession (and urllib3 with it)."""
    try:
        from certifi import where
        return where()
    except ImportError:
        import botocore
        return os.path.join(os.path.dirname(botocore.__file__), "cacert.pem")


def tls_context(verify):
    """The SSLContext botocore would use for ``verify`` (a CA bundle file or folder, True for botocore's bundle,
    False for none: tests only). Only that bundle is trusted, as with botocore: not the system's store
    (``ssl.create_default_context`` would add it, and Python 3.13's strict X.509 flags)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, host names checked
    if verify is False:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    path = default_ca_bundle() if verify is True else verify
    if os.path.isdir(path):
        context.load_verify_locations(capath=path)
    else:
        context.load_verify_locations(cafile=path)
    return context


class Transport:
    """Keep-alive connections to one endpoint, shared by the threads of a run: a request takes an idle connection
    (or opens one) and gives it back once its answer is read to the end; at most ``max_idle`` are kept."""

    def __init__(self, endpoint_url, verify=True, connect_timeout=60, read_timeout=60, max_idle=10):
        parts = urlsplit(endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("%s is not an http:// or https:// URL" % endpoint_url)
        self.endpoint_url = endpoint_url
        self.secure = parts.scheme == "https"
        # An explicit port always: http.client would read "[::1]" as host ":" port 1.
        self.host, self.port = parts.hostname, parts.port or (443 if self.secure else 80)
        self.context = tls_context(verify) if self.secure else None
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.max_idle = max(1, max_idle)
        self._idle = []
        self._lock = threading.Lock()

    def send(self, method, url, headers, body=None):
        """Send one request (``body``: bytes, or None); a ``Response`` whose body is still to be read."""
        parts = urlsplit(url)
        target = parts.path + ("?" + parts.query if parts.query else "")
        headers = dict(headers, **{"User-Agent": USER_AGENT})
        if body is None and method not in ("GET", "HEAD"):
            body = b""
        for attempt in (1, 2):
            conn, reused = self._take() if attempt == 1 else (self._new(), False)
            try:
                if conn.sock is None:  # closed after a "Connection: close" answer
                    self._connect(conn)
                conn.request(method, target, body=body, headers=headers)
                return Response(self, conn, conn.getresponse())
            except BaseException as exc:
                conn.close()
                if isinstance(exc, STALE) and reused and attempt == 1:
                    continue  # the server closed this idle keep-alive connection: once more on a new one
                if isinstance(exc, (OSError, httplib.HTTPException)):
                    raise self.failure(exc)
                if isinstance(exc, ValueError):  # a header value http.client refuses; never its text: the key or token
                    raise bex.HTTPClientError(error="a request header was refused: an access key or session token "
                                                    "with a line break or a character outside Latin-1") from None
                raise

    def close(self):
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _take(self):
        """An idle connection the server has not closed meanwhile (those are dropped), else a new one."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._new(), False
            if conn.sock is None or not dropped(conn.sock):
                return conn, True
            conn.close()

    def _new(self):
        conn = (httplib.HTTPSConnection(self.host, self.port, timeout=self.connect_timeout, context=self.context)
                if self.secure else httplib.HTTPConnection(self.host, self.port, timeout=self.connect_timeout))
        self._connect(conn)
        return conn

    def _connect(self, conn):
        try:
            conn.connect()
        except ssl.SSLError as exc:
            failure = bex.SSLError(endpoint_url=self.endpoint_url, error=exc)
        except TimeoutError as exc:
            failure = bex.ConnectTimeoutError(endpoint_url=self.endpoint_url, error=exc)
        except OSError as exc:
            failure = bex.EndpointConnectionError(endpoint_url=self.endpoint_url, error=exc)
        else:
            conn.sock.settimeout(self.read_timeout)
            return
        conn.close()
        raise failure

    def give_back(self, conn):
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def failure(self, exc):
        """botocore's exception for a failure after the connection was made."""
        if isinstance(exc, ssl.SSLCertVerificationError):
            return bex.SSLError(endpoint_url=self.endpoint_url, error=exc)
        if isinstance(exc, TimeoutError):
            return bex.ReadTimeoutError(endpoint_url=self.endpoint_url, error=exc)
        if isinstance(exc, (ConnectionError, httplib.HTTPException, ssl.SSLError)):  # a TLS stream cut short
            return bex.ConnectionClosedError(endpoint_url=self.endpoint_url)
        return bex.HTTPClientError(error=exc)


class Response:
    """What the callers read of botocore's AWSResponse: ``status_code``, ``headers`` (case-insensitive ``get``),
    ``content`` (the whole body) and ``raw`` (``read(amount)``, ``release_conn()``, ``close()``)."""

    def __init__(self, transport, conn, answer):
        self.status_code = answer.status
        self.headers = answer.msg
        self.raw = Body(transport, conn, answer)
        self._content = None

    @property
    def content(self):
        return self.load()

    def load(self):
        """Read the whole body (an error answer's first ERROR_BODY_LIMIT bytes) and give the connection back."""
        if self._content is None:
            limit = ERROR_BODY_LIMIT if self.status_code >= 300 else None
            self._content = self.raw.read(limit)
            self.raw.release_conn()
        return self._content


class Body:
    """The answer's body; the connection goes back to the pool once the body is read to its end, and is closed
    when it is given up before."""

    def __init__(self, transport, conn, answer):
        self._transport, self._conn, self._answer = transport, conn, answer

    def read(self, amount=None):
        answer = self._answer
        try:
            data = answer.read(amount)
            if not data and amount and answer.length:  # http.client says nothing of a body cut short
                raise httplib.IncompleteRead(b"", answer.length)
            return data
        except (OSError, httplib.HTTPException) as exc:
            self.close()
            raise self._transport.failure(exc)

    def release_conn(self):
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._answer.isclosed():
            self._transport.give_back(conn)
        else:
            self._answer.close()
            conn.close()

    def close(self):
        conn, self._conn = self._conn, None
        self._answer.close()
        if conn is not None:
            conn.close()
