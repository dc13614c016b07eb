# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""Ceph RGW through boto3: the one place that builds S3/SNS/STS clients for this collection.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.

Three layers, top to bottom:
- pure logic (no boto3): option spec, topic attribute normalisation and comparison, bucket notification
  merge/normalisation, URL masking, error classification. Unit-tested without services.
- client construction (``connect``), retry helper (``jittered_backoff``) and ``describe_client_error``.
- RGW operations (topics, bucket notifications) that raise ``PublisherError`` with operator-ready messages.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import functools
import json
import random
import time
import traceback

try:
    from urllib.parse import quote, urlsplit, urlunsplit
except ImportError:  # pragma: no cover - Python 2 module machinery only
    from urllib import quote  # noqa
    from urlparse import urlsplit, urlunsplit  # noqa

try:
    import boto3
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError
    HAS_BOTO3 = True
    BOTO3_IMPORT_ERROR = None
except ImportError:
    HAS_BOTO3 = False
    BOTO3_IMPORT_ERROR = traceback.format_exc()

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._module import (
    PublisherError,
    secret_option,
)

# ---------------------------------------------------------------------------------------------------------------
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

# ---------------------------------------------------------------------------------------------------------------
# Pure logic


def mask_url_userinfo(url):
    """``amqp://user:pw@host:5672/vh`` -> ``amqp://user:********@host:5672/vh``; URLs without a password unchanged."""
    if not url or "@" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparseable URL hidden)"
    if parts.password is None and "@" not in parts.netloc:
        return url
    userinfo, hostport = parts.netloc.rsplit("@", 1)
    user = userinfo.split(":", 1)[0]
    masked = "%s:********@%s" % (user, hostport) if ":" in userinfo else "%s@%s" % (user, hostport)
    return urlunsplit((parts.scheme, masked, parts.path, parts.query, parts.fragment))


def url_has_credentials(url):
    try:
        parts = urlsplit(url or "")
    except ValueError:
        return False
    return "@" in parts.netloc


def url_password(url):
    """The password in a URL's userinfo, or None: modules add it to no_log_values."""
    try:
        return urlsplit(url or "").password
    except ValueError:
        return None


def bool_text(value):
    return "true" if value else "false"


def text_bool(value, default):
    """RGW stores booleans as text ('true', 'True', '1') or JSON booleans."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("true", "1", "yes")


def topic_arn_for(name, region, tenant=""):
    """The ARN RGW gives a topic (zonegroup = region): used to predict the ARN in check mode."""
    return "arn:aws:sns:%s:%s:%s" % (region, tenant, name)


def desired_topic(params):
    """The canonical form of the topic an operator asks for (module options -> comparable dict)."""
    return dict(
        push_endpoint=params["push_endpoint"],
        amqp_exchange=params["amqp_exchange"],
        amqp_ack_level=params["amqp_ack_level"],
        verify_ssl=bool(params["verify_ssl"]),
        persistent=bool(params["persistent"]),
        opaque_data=params.get("opaque_data") or "",
    )


def topic_create_attributes(topic):
    """Canonical topic -> SNS CreateTopic ``Attributes`` as RGW names them."""
    attributes = {
        "push-endpoint": topic["push_endpoint"],
        "amqp-exchange": topic["amqp_exchange"],
        "amqp-ack-level": topic["amqp_ack_level"],
        "verify-ssl": bool_text(topic["verify_ssl"]),
        "persistent": bool_text(topic["persistent"]),
    }
    if topic["opaque_data"]:
        attributes["OpaqueData"] = topic["opaque_data"]
    return attributes


def parse_endpoint_args(text):
    """RGW's ``EndpointArgs``: the CreateTopic query string it stored, ``k=v&k=v`` (values not URL-encoded).

    RGW keeps both the raw ``Attributes.entry.N.key/value`` pairs and the flattened ``key=value`` ones; the
    flattened ones are what it uses, so those are returned.
    """
    args = {}
    for pair in (text or "").split("&"):
        if not pair or "=" not in pair:
            continue
        key, value = pair.split("=", 1)
        if key.startswith("Attributes.") or key in ("Action", "Name", "Version", "PayloadHash"):
            continue
        args[key] = value
    return args


def topic_from_attributes(attributes):
    """GetTopicAttributes ``Attributes`` from RGW 16.2 -> the canonical topic (same keys as ``desired_topic``).

    RGW puts the push endpoint in ``EndPoint``, a JSON text: ``{"EndpointAddress": url, "EndpointArgs":
    "k=v&...", "EndpointTopic": name, "HasStoredSecret": "false", "Persistent": "false"}``.
    Unset attributes take RGW's defaults (ack level broker, verify-ssl true, not persistent).
    """
    try:
        endpoint = json.loads(attributes.get("EndPoint") or "{}")
    except ValueError:
        endpoint = {}
    args = parse_endpoint_args(endpoint.get("EndpointArgs"))
    return dict(
        push_endpoint=endpoint.get("EndpointAddress") or args.get("push-endpoint", ""),
        amqp_exchange=args.get("amqp-exchange", ""),
        amqp_ack_level=args.get("amqp-ack-level", "broker"),
        verify_ssl=text_bool(args.get("verify-ssl"), True),
        persistent=text_bool(endpoint.get("Persistent", args.get("persistent")), False),
        opaque_data=attributes.get("OpaqueData") or args.get("OpaqueData", ""),
    )


def masked_topic(topic):
    """A canonical topic fit for results and diffs: the push endpoint's password hidden."""
    if topic is None:
        return None
    shown = dict(topic)
    shown["push_endpoint"] = mask_url_userinfo(shown["push_endpoint"])
    return shown


def topic_differences(current, desired):
    """Sorted names of the canonical fields that differ (empty when the topic already matches)."""
    return sorted(key for key in desired if current.get(key) != desired[key])


def _filter_rules(config):
    rules = ((config.get("Filter") or {}).get("Key") or {}).get("FilterRules") or []
    # RGW answers with "prefix"/"suffix"; AWS with "Prefix"/"Suffix".
    return dict((rule.get("Name", "").lower(), rule.get("Value", "")) for rule in rules)


def normalise_notification(config):
    """One TopicConfiguration -> {id, topic_arn, events (sorted), prefix, suffix}, comparable across RGW/AWS."""
    if config is None:
        return None
    rules = _filter_rules(config)
    return dict(
        id=config.get("Id", ""),
        topic_arn=config.get("TopicArn", ""),
        events=sorted(set(config.get("Events") or [])),
        prefix=rules.get("prefix", ""),
        suffix=rules.get("suffix", ""),
    )


def notification_config(notification):
    """Canonical notification -> the TopicConfiguration that PutBucketNotificationConfiguration takes."""
    config = {"Id": notification["id"], "TopicArn": notification["topic_arn"], "Events": list(notification["events"])}
    rules = []
    if notification["prefix"]:
        rules.append({"Name": "prefix", "Value": notification["prefix"]})
    if notification["suffix"]:
        rules.append({"Name": "suffix", "Value": notification["suffix"]})
    if rules:
        config["Filter"] = {"Key": {"FilterRules": rules}}
    return config


def desired_notification(params):
    return dict(
        id=params["id"],
        topic_arn=params["topic_arn"],
        events=sorted(set(params["events"])),
        prefix=params.get("prefix") or "",
        suffix=params.get("suffix") or "",
    )


def merge_notification(topic_configurations, notification_id, new_config):
    """Every other Id kept as it was; ``new_config`` replaces or appends Id, or Id removed when it is None."""
    merged = [config for config in topic_configurations if config.get("Id") != notification_id]
    if new_config is not None:
        merged.append(new_config)
    return merged


def clean_topic_configuration(config):
    """A TopicConfiguration as read back, reduced to what Put accepts (RGW may add empty filter sections)."""
    cleaned = {"Id": config["Id"], "TopicArn": config["TopicArn"], "Events": list(config.get("Events") or [])}
    filter_ = {}
    for section, value in (config.get("Filter") or {}).items():
        rules = (value or {}).get("FilterRules") or []
        if rules:
            filter_[section] = {"FilterRules": rules}
    if filter_:
        cleaned["Filter"] = filter_
    return cleaned


# Error codes worth another attempt: throttling and transient server errors (amazon.aws AWSRetry.found list).
RETRYABLE_ERROR_CODES = frozenset([
    "RequestLimitExceeded", "Throttling", "ThrottlingException", "TooManyRequestsException", "SlowDown",
    "RequestTimeout", "RequestTimeoutException", "ServiceUnavailable", "Unavailable", "InternalError",
    "InternalFailure", "ServerError",
])
ACCESS_KEY_ERROR_CODES = frozenset(["InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidClientTokenId"])


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

    botocore's own retries already cover single calls; this is for sequences that need more patience, such as a
    bucket that was just created elsewhere (``catch_extra_error_codes=['NoSuchBucket']``).
    """
    def decorator(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            for attempt in range(retries + 1):
                try:
                    return func(*args, **kwargs)
                except Exception as exc:  # only botocore errors are classified as retryable
                    if attempt >= retries or not is_retryable(exc, catch_extra_error_codes):
                        raise
                    sleep(random.uniform(0, min(max_delay, delay * (2 ** attempt))))
        return wrapper
    return decorator


def describe_client_error(exc, action, endpoint_url=None):
    """A botocore error -> one operator message: what was being done, what went wrong, what to check."""
    where = endpoint_url or (getattr(exc, "kwargs", None) or {}).get("endpoint_url") or "the configured endpoint_url"
    if HAS_BOTO3:
        from botocore import exceptions as bex
        if isinstance(exc, bex.SSLError):
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
        return ("access denied while trying to %s: the RGW user lacks permission (%s)"
                % (action, _error_text(exc)))
    if code or status:
        return "RGW failed to %s: %s" % (action, _error_text(exc))
    return "RGW failed to %s: %s: %s" % (action, type(exc).__name__, exc)


def _error_text(exc):
    code, message = _error_fields(exc)
    code = code or "error"
    status = error_status(exc)
    text = "%s: %s" % (code, message) if message and message != code else code
    return "%s (HTTP %s)" % (text, status) if status else text


# ---------------------------------------------------------------------------------------------------------------
# Clients


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
    return Config(**options)


def connect(params, service, max_pool_connections=DEFAULT_MAX_POOL_CONNECTIONS, max_attempts=DEFAULT_MAX_ATTEMPTS,
            **config_overrides):
    """A boto3 client for ``service`` ('s3', 'sns', 'sts') against RGW, from the ``rgw`` doc-fragment options.

    Static credentials come from ``access_key``/``secret_key`` (or their ``_file`` options), else boto3's usual
    chain. With ``assume_role_arn`` those credentials only call STS AssumeRole; the client uses the role's.
    ``max_attempts`` is botocore's: retries after the first try. ``max_pool_connections`` sizes the HTTP pool (set
    it to the number of parallel transfers). ``config_overrides`` go into botocore's Config (e.g. ``read_timeout``).
    """
    require_boto3()
    endpoint_url = params["endpoint_url"]
    config = client_config(max_pool_connections, max_attempts, **config_overrides)
    session = boto3.session.Session(
        aws_access_key_id=secret_option(params, "access_key", "RGW access key"),
        aws_secret_access_key=secret_option(params, "secret_key", "RGW secret key"),
        aws_session_token=params.get("session_token") or None,
        region_name=params.get("region") or "default",
    )
    verify = _verify(params)
    if params.get("assume_role_arn"):
        session = _assumed_role_session(session, params, endpoint_url, verify, config)
    try:
        return session.client(service, endpoint_url=endpoint_url, verify=verify, config=config)
    except (BotoCoreError, ValueError) as exc:
        raise PublisherError("cannot build an RGW %s client for %s: %s" % (service, endpoint_url, exc))


def _assumed_role_session(session, params, endpoint_url, verify, config):
    sts = session.client("sts", endpoint_url=endpoint_url, verify=verify, config=config)
    action = "assume role %s" % params["assume_role_arn"]
    try:
        session_name = params.get("role_session_name") or "cvmfs-publisher"
        credentials = sts.assume_role(RoleArn=params["assume_role_arn"], RoleSessionName=session_name)["Credentials"]
    except (BotoCoreError, ClientError) as exc:
        raise PublisherError(describe_client_error(exc, action, endpoint_url))
    return boto3.session.Session(
        aws_access_key_id=credentials["AccessKeyId"],
        aws_secret_access_key=credentials["SecretAccessKey"],
        aws_session_token=credentials["SessionToken"],
        region_name=session.region_name,
    )


def _endpoint_of(client):
    return client.meta.endpoint_url


def _fail(exc, action, client):
    return PublisherError(describe_client_error(exc, action, _endpoint_of(client)))


# ---------------------------------------------------------------------------------------------------------------
# Topics (SNS API of RGW)


def find_topic(sns, name):
    """The topic called ``name`` as (arn, GetTopicAttributes ``Attributes``), or (None, None).

    RGW 16.2's ListTopics also lists internal ``<notification id>_<topic>`` entries under the topic's own ARN,
    and keeps them after DeleteTopic: a listed ARN is only a candidate until GetTopicAttributes confirms it.
    """
    candidates = []
    try:
        kwargs = {}
        while True:
            page = sns.list_topics(**kwargs)
            for entry in page.get("Topics") or []:
                arn = entry.get("TopicArn", "")
                if arn.rsplit(":", 1)[-1] == name and arn not in candidates:
                    candidates.append(arn)
            if not page.get("NextToken"):
                break
            kwargs["NextToken"] = page["NextToken"]
    except (BotoCoreError, ClientError) as exc:
        raise _topic_read_error(exc, "list topics", sns)
    for arn in candidates:
        try:
            return arn, sns.get_topic_attributes(TopicArn=arn)["Attributes"]
        except ClientError as exc:
            if error_code(exc) in ("NotFound", "NoSuchEntity", "NoSuchKey") or error_status(exc) == 404:
                continue
            raise _topic_read_error(exc, "read topic %s" % name, sns)
        except BotoCoreError as exc:
            raise _fail(exc, "read topic %s" % name, sns)
    return None, None


def _topic_read_error(exc, action, sns):
    """RGW 16.2 answers 403 to every topic read over plain http once any topic stores a password: say so."""
    error = _fail(exc, action, sns)
    if (error_status(exc) == 403 and error_code(exc) not in ACCESS_KEY_ERROR_CODES
            and _endpoint_of(sns).lower().startswith("http://")):
        error.msg += ("; RGW also refuses topic reads over http when a topic stores push_endpoint credentials "
                      "(use an https endpoint_url)")
    return error


def create_topic(sns, name, topic):
    """Create or update (RGW's CreateTopic overwrites) a topic; returns its ARN."""
    try:
        return sns.create_topic(Name=name, Attributes=topic_create_attributes(topic))["TopicArn"]
    except ClientError as exc:
        endpoint_url = _endpoint_of(sns)
        if (error_status(exc) == 400 and endpoint_url.lower().startswith("http://")
                and url_has_credentials(topic["push_endpoint"])):
            raise PublisherError(
                "RGW refused the topic: credentials in push_endpoint must be sent over HTTPS to RGW "
                "(endpoint_url is %s); use an https endpoint_url or a push_endpoint without user:password"
                % endpoint_url)
        raise _fail(exc, "create topic %s" % name, sns)
    except BotoCoreError as exc:
        raise _fail(exc, "create topic %s" % name, sns)


def delete_topic(sns, arn):
    try:
        sns.delete_topic(TopicArn=arn)
    except (BotoCoreError, ClientError) as exc:
        raise _fail(exc, "delete topic %s" % arn, sns)


# ---------------------------------------------------------------------------------------------------------------
# Bucket notifications (S3 API of RGW)


def get_topic_configurations(s3, bucket, missing_ok=False):
    """The bucket's TopicConfigurations; a missing bucket is an error that names it (None with ``missing_ok``)."""
    try:
        response = s3.get_bucket_notification_configuration(Bucket=bucket)
    except ClientError as exc:
        if error_code(exc) == "NoSuchBucket":
            if missing_ok:
                return None
            raise PublisherError("bucket '%s' does not exist at %s: create it first (the bucket is the repository's "
                                 "short name)" % (bucket, _endpoint_of(s3)))
        raise _fail(exc, "read the notification configuration of bucket %s" % bucket, s3)
    except BotoCoreError as exc:
        raise _fail(exc, "read the notification configuration of bucket %s" % bucket, s3)
    return response.get("TopicConfigurations") or []


def put_topic_configurations(s3, bucket, topic_configurations):
    action = "write the notification configuration of bucket %s" % bucket
    try:
        s3.put_bucket_notification_configuration(
            Bucket=bucket,
            NotificationConfiguration={"TopicConfigurations": [clean_topic_configuration(c)
                                                               for c in topic_configurations]})
    except (BotoCoreError, ClientError) as exc:
        raise _fail(exc, action, s3)


def delete_notification(s3, bucket, notification_id):
    """RGW's ``DELETE /<bucket>?notification=<id>``: removes one notification, others stay.

    The only way to drop a notification on RGW 16.2: a Put merges into the existing configuration instead of
    replacing it, and an empty Put is refused with MalformedXML. boto3 has no such operation, so the request is
    signed with the client's own credentials and sent on its HTTP session (same TLS settings and pool).
    """
    action = "delete notification %s of bucket %s" % (notification_id, bucket)
    url = "%s/%s?notification=%s" % (_endpoint_of(s3).rstrip("/"), quote(bucket, safe=""),
                                     quote(notification_id, safe=""))
    request = AWSRequest(method="DELETE", url=url, data=b"")
    try:
        credentials = s3._request_signer._credentials.get_frozen_credentials()
        S3SigV4Auth(credentials, "s3", s3.meta.region_name).add_auth(request)
        response = s3._endpoint.http_session.send(request.prepare())
    except BotoCoreError as exc:
        raise _fail(exc, action, s3)
    if response.status_code >= 300:
        raise _fail(_client_error_from_http(response, "DeleteBucketNotification"), action, s3)


def _client_error_from_http(response, operation):
    """A ClientError from a raw S3 XML error answer, so ``describe_client_error`` handles it like the others."""
    from xml.etree import ElementTree
    code, message = "", ""
    try:
        root = ElementTree.fromstring(response.content or b"<Error/>")
        code = root.findtext("Code") or ""
        message = root.findtext("Message") or ""
    except ElementTree.ParseError:
        pass
    return ClientError({"Error": {"Code": code or str(response.status_code), "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": response.status_code}}, operation)


def remove_notification(s3, bucket, notification_id, count):
    """Remove every entry of one Id (RGW 16.2 keeps one per Id and topic), then check that none is left."""
    for _attempt in range(count):
        delete_notification(s3, bucket, notification_id)
    left = [c for c in get_topic_configurations(s3, bucket) if c.get("Id") == notification_id]
    if left:
        raise PublisherError("RGW still lists notification %s on bucket %s after deleting it %d times"
                             % (notification_id, bucket, count))


# ---------------------------------------------------------------------------------------------------------------
# What the modules do


def ensure_topic(sns, params, check_mode):
    """rgw_topic: create, update (CreateTopic again: RGW overwrites) or delete one topic; returns the result."""
    name = params["name"]
    arn, attributes = find_topic(sns, name)
    current = topic_from_attributes(attributes) if attributes is not None else None
    if params["state"] == "absent":
        if current is not None and not check_mode:
            delete_topic(sns, arn)
        return dict(changed=current is not None, name=name, arn=arn, notifications_need_refresh=False,
                    diff=dict(before=masked_topic(current), after=None))

    desired = desired_topic(params)
    differences = topic_differences(current, desired) if current is not None else sorted(desired)
    if current is not None and not differences:
        return dict(changed=False, name=name, arn=arn, topic=masked_topic(current), changed_attributes=[],
                    notifications_need_refresh=False, diff=dict(before=masked_topic(current),
                                                                after=masked_topic(current)))
    if check_mode:
        arn = arn or topic_arn_for(name, params.get("region") or "default")
    else:
        arn = create_topic(sns, name, desired)
    return dict(
        changed=True, name=name, arn=arn, topic=masked_topic(desired), changed_attributes=differences,
        # RGW applies a topic's new attributes only to notifications created after the change.
        notifications_need_refresh=current is not None,
        diff=dict(before=masked_topic(current), after=masked_topic(desired)),
    )


def ensure_bucket_notification(s3, params, check_mode):
    """rgw_bucket_notification: merge (or remove) one notification Id, other Ids untouched; returns the result.

    RGW 16.2 merges a Put into the existing configuration (it never drops other Ids) and keys entries by Id and
    topic: putting an Id with another topic adds a second entry, so a topic change first deletes the Id's entries.
    """
    bucket, notification_id = params["bucket"], params["id"]
    absent = params["state"] == "absent"
    configurations = get_topic_configurations(s3, bucket, missing_ok=absent)
    if configurations is None:  # a bucket that is gone has no notification left to remove
        return dict(changed=False, bucket=bucket, id=notification_id, other_ids=[], notification=None,
                    bucket_exists=False, diff=dict(before=None, after=None))
    mine = [c for c in configurations if c.get("Id") == notification_id]
    current = normalise_notification(mine[0]) if mine else None
    other_ids = sorted(set(c.get("Id", "") for c in configurations) - set([notification_id]))
    result = dict(bucket=bucket, id=notification_id, other_ids=other_ids, bucket_exists=True)
    if absent:
        if mine and not check_mode:
            remove_notification(s3, bucket, notification_id, len(mine))
        result.update(changed=bool(mine), notification=None, diff=dict(before=current, after=None))
        return result

    desired = desired_notification(params)
    changed = len(mine) != 1 or current != desired
    if changed and not check_mode:
        if len(mine) > 1 or (current and current["topic_arn"] != desired["topic_arn"]):
            remove_notification(s3, bucket, notification_id, len(mine))
        put_topic_configurations(s3, bucket, merge_notification(configurations, notification_id,
                                                                notification_config(desired)))
    result.update(changed=changed, notification=desired, diff=dict(before=current, after=desired))
    return result
