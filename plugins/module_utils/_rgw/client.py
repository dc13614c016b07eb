# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""The RGW client: options, connection (static keys or AssumeRole), error classification, retries, and the one
helper every call goes through: ``Connection.signed_request`` (S3 and SNS requests signed as botocore signs them,
sent by ``_rgw/transport.py``).

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import functools
import time
import traceback

try:
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass
except ImportError:  # pragma: no cover - Python 2 module machinery only
    from urllib import getproxies, proxy_bypass  # noqa
    from urlparse import urlsplit  # noqa

try:
    # Only botocore's exceptions at import time. The rest of botocore (session, Config, its HTTP stack: a tenth of a
    # second of every module run) is imported when a boto3 client, AssumeRole or a proxy needs it: a sync run with
    # static keys signs and sends its requests itself (_rgw/transport.py) and never imports it.
    from botocore.exceptions import BotoCoreError, ClientError
    HAS_BOTO3 = True
    BOTO3_IMPORT_ERROR = None
except ImportError:
    HAS_BOTO3 = False
    BOTO3_IMPORT_ERROR = traceback.format_exc()

    class BotoCoreError(Exception):  # stand-ins keep callers' except clauses valid; require_boto3 reports it
        pass

    class ClientError(Exception):
        pass

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._module import (
    PublisherError,
    secret_option,
    tls_failure,
    with_backoff,
)
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw import transport

# Options (documented once in plugins/doc_fragments/rgw.py)
RGW_ARGUMENT_SPEC = dict(
    endpoint_url=dict(type="str", required=True, aliases=["rgw_endpoint"]),
    access_key=dict(type="str", no_log=False),
    access_key_file=dict(type="path"),
    secret_key=dict(type="str", no_log=True),
    secret_key_file=dict(type="path", no_log=False),
    session_token=dict(type="str", no_log=True),
    region=dict(type="str", default="default"),
    ca_bundle=dict(type="path"),
    validate_certs=dict(type="bool", default=True),
    assume_role_arn=dict(type="str"),
    role_session_name=dict(type="str", default="cvmfs-publisher"),
)
RGW_MUTUALLY_EXCLUSIVE = [["access_key", "access_key_file"], ["secret_key", "secret_key_file"]]

DEFAULT_MAX_POOL_CONNECTIONS = 10
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_TIMEOUT_S = 60  # botocore's connect and read timeouts

# ---------------------------------------------------------------------------------------------------------------
# Error codes worth another attempt: throttling and transient server errors (amazon.aws AWSRetry.found list).
RETRYABLE_ERROR_CODES = frozenset([
    "RequestLimitExceeded", "Throttling", "ThrottlingException", "TooManyRequestsException", "SlowDown",
    "RequestTimeout", "RequestTimeoutException", "ServiceUnavailable", "Unavailable", "InternalError",
    "InternalFailure", "ServerError",
])
ACCESS_KEY_ERROR_CODES = frozenset(["InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidClientTokenId"])
# botocore operation -> the IAM action (bucket policy / role policy) RGW checks for it. RGW 16.2 checks the bucket
# notification calls against bucket ownership only (docs/operator-guide.md, "Rights"): said in the message too.
OPERATION_RIGHTS = {
    "ListObjectsV2": "s3:ListBucket", "ListObjects": "s3:ListBucket", "HeadBucket": "s3:ListBucket",
    "GetObject": "s3:GetObject", "HeadObject": "s3:GetObject", "PutObject": "s3:PutObject",
    "DeleteObject": "s3:DeleteObject", "DeleteObjects": "s3:DeleteObject",
    "PutBucketNotificationConfiguration": "s3:PutBucketNotification",
    "GetBucketNotificationConfiguration": "s3:GetBucketNotification",
    "CreateTopic": "sns:CreateTopic", "GetTopicAttributes": "sns:GetTopicAttributes", "DeleteTopic": "sns:DeleteTopic",
    "ListTopics": "sns:ListTopics", "AssumeRole": "sts:AssumeRole",
}
OWNER_ONLY_NOTE = " (RGW 16.2 allows bucket notification calls to the bucket's owner only, whatever its policy says)"


def _error_fields(exc):
    """(code, message) of a ClientError. RGW's SNS API answers ``<Error><Code>`` without AWS's ``ErrorResponse``
    wrapper, which botocore then reports as code "Unknown" with the real code at the top of ``response``."""
    response = getattr(exc, "response", None) or {}
    error = response.get("Error") or {}
    code = error.get("Code") or ""
    message = error.get("Message") or ""
    if not code or code == "Unknown":
        code = response.get("Code") or ("" if code == "Unknown" else code)
        message = message if message != "Unknown" else ""
        message = message or response.get("Message") or ""
    return code, message


def error_code(exc):
    return _error_fields(exc)[0]


def error_status(exc):
    response = getattr(exc, "response", None) or {}
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def is_connection_error(exc):
    """botocore's connection failures (refused, DNS, TLS handshake, timeouts), duck-typed so tests need no sockets."""
    if not HAS_BOTO3:
        return False
    from botocore import exceptions as bex
    return isinstance(exc, (bex.EndpointConnectionError, bex.ConnectionClosedError, bex.ConnectTimeoutError,
                            bex.ReadTimeoutError, bex.HTTPClientError))


def is_retryable(exc, extra_codes=()):
    """True for throttling, 5xx and connection errors: the failures another attempt may cure."""
    if is_connection_error(exc):
        return True
    code = error_code(exc)
    if not code and error_status(exc) is None:
        return False
    status = error_status(exc) or 0
    return code in RETRYABLE_ERROR_CODES or code in extra_codes or status == 429 or status >= 500


def jittered_backoff(retries=5, delay=1.0, max_delay=30.0, catch_extra_error_codes=(), sleep=time.sleep):
    """Decorator (AWSRetry.jittered_backoff style): retry on ``is_retryable`` errors with full-jitter backoff.
    ``retried_request`` is the policy of one signed request; other sequences may need more patience, such as a
    bucket that was just created elsewhere (``catch_extra_error_codes=['NoSuchBucket']``).
    """
    def decorator(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            return with_backoff(lambda: func(*args, **kwargs), lambda exc: is_retryable(exc, catch_extra_error_codes),
                                retries, delay, max_delay, sleep)
        return wrapper
    return decorator


# The retries of one signed request (a listing page, HeadObject, GetObject, the modules' calls): 5 tries in all,
# the waits between them at most 0.5, 1, 2 and 4 s.
retried_request = jittered_backoff(retries=4, delay=0.5)


def _lacking(exc, identity):
    """"RGW identity 'X' lacks s3:Y" for an access denial, as far as the operation and identity are known."""
    right = OPERATION_RIGHTS.get(getattr(exc, "operation_name", None) or "")
    who = "RGW identity '%s'" % identity if identity else "the RGW user"
    if not right:
        return "%s lacks permission" % who
    return "%s lacks %s%s" % (who, right, OWNER_ONLY_NOTE if "BucketNotification" in right else "")


def describe_client_error(exc, action, endpoint_url=None, identity=None):
    """A botocore error -> one operator message: what was being done, what went wrong, what to check.
    ``identity`` (an access key id or a role ARN, never a secret) names who was refused."""
    where = endpoint_url or (getattr(exc, "kwargs", None) or {}).get("endpoint_url") or "the configured endpoint_url"
    if HAS_BOTO3:
        from botocore import exceptions as bex
        if isinstance(exc, bex.SSLError):
            refused = tls_failure(exc, "RGW", where, "ca_bundle")
            if refused:
                return "cannot %s: %s" % (action, refused)
            return ("TLS error talking to RGW at %s while trying to %s: %s (set ca_bundle to the CA that signed "
                    "RGW's certificate)" % (where, action, exc))
        if isinstance(exc, bex.NoCredentialsError):
            return ("no RGW credentials while trying to %s: set access_key/access_key_file and "
                    "secret_key/secret_key_file" % action)
        if is_connection_error(exc):
            return "RGW unreachable at %s while trying to %s: %s" % (where, action, exc)
    code = error_code(exc)
    status = error_status(exc)
    if code in ACCESS_KEY_ERROR_CODES:
        return "access denied: check access/secret key (RGW said %s while trying to %s)" % (code, action)
    if code == "AccessDenied" or status == 403:
        return "access denied while trying to %s: %s (%s)" % (action, _lacking(exc, identity), error_text(exc))
    if code or status:
        return "RGW failed to %s: %s" % (action, error_text(exc))
    return "RGW failed to %s: %s: %s" % (action, type(exc).__name__, exc)


def error_text(exc):
    code, message = _error_fields(exc)
    code = code or "error"
    status = error_status(exc)
    text = "%s: %s" % (code, message) if message and message != code else code
    return "%s (HTTP %s)" % (text, status) if status else text


# ---------------------------------------------------------------------------------------------------------------
# Connection


def require_boto3():
    if not HAS_BOTO3:
        raise PublisherError("boto3 and botocore are required on the managed host (pip install boto3)",
                             exception=BOTO3_IMPORT_ERROR)


def _verify(params):
    """botocore's ``verify``: the CA bundle path, or False to skip verification (tests only), or True."""
    if params.get("ca_bundle"):
        return params["ca_bundle"]
    return bool(params.get("validate_certs", True))


def client_config(max_pool_connections=DEFAULT_MAX_POOL_CONNECTIONS, max_attempts=DEFAULT_MAX_ATTEMPTS, **overrides):
    """botocore Config shared by every client: standard retries, checksums only when required (RGW/older S3),
    path-style addressing (RGW without rgw_dns_name), and a connection pool sized by the caller."""
    options = dict(
        retries={"mode": "standard", "max_attempts": max_attempts},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=max_pool_connections,
        s3={"addressing_style": "path"},
    )
    options.update(overrides)
    from botocore.config import Config
    return Config(**options)


def environ_proxies(url):
    """The proxies the environment sets for ``url`` (none when NO_PROXY covers it): botocore's
    ``get_environ_proxies``, without importing botocore.utils."""
    try:
        if proxy_bypass(urlsplit(url).netloc):
            return {}
    except (TypeError, OSError):
        pass
    return getproxies()


class Connection:
    """One RGW endpoint with one set of credentials, from the ``rgw`` doc-fragment options.

    Static credentials come from ``access_key``/``secret_key`` (or their ``_file`` options), else botocore's usual
    chain. With ``assume_role_arn`` those credentials only call STS AssumeRole (botocore's STS client, with
    ``max_attempts``: retries after the first try); the requests are signed with the role's. ``max_pool_connections``
    sizes the HTTP pool (set it to the number of parallel transfers). ``config_overrides`` go into botocore's Config
    (``connect_timeout``, ``read_timeout``, ``proxies``, ``client_cert``). Every request is a ``signed_request``.
    """

    def __init__(self, params, max_pool_connections=DEFAULT_MAX_POOL_CONNECTIONS, max_attempts=DEFAULT_MAX_ATTEMPTS,
                 **config_overrides):
        require_boto3()
        self.endpoint_url = params["endpoint_url"]
        self.verify = _verify(params)
        self.region_name = params.get("region") or "default"
        self.identity = secret_option(params, "access_key", "RGW access key")  # a key id names the identity
        secret_key = secret_option(params, "secret_key", "RGW secret key")
        token = params.get("session_token") or None
        self._max_pool_connections, self._max_attempts = max_pool_connections, max_attempts
        self._overrides = config_overrides
        self._config = None
        # Static keys sign requests as they are; anything else goes through a botocore session (its credential
        # chain, refreshed as botocore refreshes it), made on first use.
        self._static = transport.Credentials(self.identity, secret_key, token) if self.identity and secret_key \
            else None
        self._session_credentials = (self.identity, secret_key, token)
        self._session = None
        if params.get("assume_role_arn"):
            self._session = self._assumed_role_session(params)
            self._static = None
            self.identity = params["assume_role_arn"]
        self._http = None
        self._signers = {}

    @property
    def config(self):
        """botocore's Config (``client_config``) for STS and a proxied HTTP stack, made on first use."""
        if self._config is None:
            self._config = client_config(self._max_pool_connections, self._max_attempts, **self._overrides)
        return self._config

    @property
    def session(self):
        """The botocore session behind STS and the credentials when they are not static keys."""
        if self._session is None:
            self._session = _session(*self._session_credentials)
        return self._session

    def credentials(self):
        """The frozen credentials a request is signed with; NoCredentialsError when there are none."""
        if self._static is not None:
            return self._static
        credentials = self.session.get_credentials()
        if credentials is None:
            from botocore.exceptions import NoCredentialsError
            raise NoCredentialsError()
        return credentials.get_frozen_credentials()

    def _assumed_role_session(self, params):
        sts = self.session.create_client("sts", region_name=self.region_name, endpoint_url=self.endpoint_url,
                                         verify=self.verify, config=self.config)
        action = "assume role %s" % params["assume_role_arn"]
        try:
            session_name = params.get("role_session_name") or "cvmfs-publisher"
            credentials = sts.assume_role(RoleArn=params["assume_role_arn"],
                                          RoleSessionName=session_name)["Credentials"]
        except (BotoCoreError, ClientError) as exc:
            raise PublisherError(describe_client_error(exc, action, self.endpoint_url, self.identity))
        return _session(credentials["AccessKeyId"], credentials["SecretAccessKey"], credentials["SessionToken"])

    def _http_session(self):
        """Where signed requests go: ``_rgw/transport.Transport`` for a direct connection; botocore's own
        ``URLLib3Session`` (set up as botocore sets up a client's) through a proxy or with a client certificate."""
        if self._http is None:
            overrides = self._overrides
            proxies = overrides.get("proxies") or environ_proxies(self.endpoint_url)
            # botocore proxies a request only when its scheme has a proxy (ProxyConfiguration.proxy_url_for):
            # NO_PROXY alone, or an http proxy with an https endpoint, is a direct connection.
            if proxies.get(urlsplit(self.endpoint_url).scheme) or overrides.get("client_cert"):
                from botocore.httpsession import URLLib3Session
                config = self.config
                self._http = URLLib3Session(
                    verify=self.verify, proxies=proxies, timeout=(config.connect_timeout, config.read_timeout),
                    max_pool_connections=config.max_pool_connections, client_cert=config.client_cert,
                    proxies_config=config.proxies_config)
            else:
                try:
                    self._http = transport.Transport(
                        self.endpoint_url, self.verify, overrides.get("connect_timeout", DEFAULT_TIMEOUT_S),
                        overrides.get("read_timeout", DEFAULT_TIMEOUT_S), self._max_pool_connections)
                except ValueError as exc:
                    raise PublisherError("cannot send requests to RGW: endpoint_url %s" % exc)
                except (IOError, OSError) as exc:  # ssl.SSLError is an OSError
                    raise PublisherError("cannot set up TLS for RGW at %s with ca_bundle %s: %s"
                                         % (self.endpoint_url, self.verify, getattr(exc, "strerror", None) or exc))
        return self._http

    def signed_request(self, method, url, operation, stream=False, body=None, content_type=None, service="s3"):
        """Send one SigV4-signed request (``credentials()``) to ``service``'s API: S3's by default, or 'sns'.

        Returns the HTTP response (``stream``: the body is read from ``response.raw``); an HTTP error answer raises
        a ClientError parsed from RGW's XML, so messages and retries treat it like boto3's own.
        """
        credentials = self.credentials()
        http = self._http_session()
        if isinstance(http, transport.Transport):
            signer = self._signers.get(service)
            if signer is None:
                signer = self._signers[service] = transport.Signer(self.region_name, service)
            response = http.send(method, url, signer.headers(method, url, credentials, body=body,
                                                             content_type=content_type), body)
            if not stream or response.status_code >= 300:
                response.load()
        else:
            from botocore.auth import S3SigV4Auth, SigV4Auth
            from botocore.awsrequest import AWSRequest
            request = AWSRequest(method=method, url=url, stream_output=stream,
                                 data=body if body is not None else (b"" if method != "GET" else None),
                                 headers={"Content-Type": content_type} if content_type else None)
            (S3SigV4Auth if service == "s3" else SigV4Auth)(credentials, service, self.region_name).add_auth(request)
            response = http.send(request.prepare())
        if response.status_code >= 300:
            if stream:
                response.raw.close()
            raise client_error_from_http(response, operation)
        return response

    def failure(self, exc, action):
        """The PublisherError for a botocore error met while doing ``action`` against this endpoint."""
        return PublisherError(describe_client_error(exc, action, self.endpoint_url, self.identity))


def _session(access_key, secret_key, session_token):
    """A botocore session with these credentials, or (all None) botocore's usual credential chain."""
    import botocore.session
    session = botocore.session.Session()
    if access_key or secret_key or session_token:
        session.set_credentials(access_key, secret_key, session_token)
    return session


def client_error_from_http(response, operation):
    """A ClientError from a raw XML error answer (S3's ``<Error>``, SNS's ``<ErrorResponse><Error>``, with or
    without a namespace), so ``describe_client_error`` handles it like the others. An answer without RGW's XML (a
    proxy's error page, a redirect) is described by its HTTP reason, and a redirect by where it points."""
    from xml.etree import ElementTree
    code, message = "", ""
    try:
        root = ElementTree.fromstring(response.content or b"<Error/>")
        code = root.findtext(".//{*}Code") or ""
        message = root.findtext(".//{*}Message") or ""
    except ElementTree.ParseError:
        pass
    if not code:
        message = transport.httplib.responses.get(response.status_code, "")
        location = response.headers.get("Location") if 300 <= response.status_code < 400 else None
        if location:
            message = "%s to %s" % (message, location) if message else "redirected to %s" % location
    return ClientError({"Error": {"Code": code or str(response.status_code), "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": response.status_code}}, operation)
