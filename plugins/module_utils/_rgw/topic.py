# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""RGW topics: attribute normalisation and comparison, the calls (``_rgw/sns.py``), and ``rgw_topic``'s ensure logic.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json

try:
    from urllib.parse import urlsplit, urlunsplit
except ImportError:  # pragma: no cover - Python 2 module machinery only
    from urlparse import urlsplit, urlunsplit  # noqa

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._module import PublisherError
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw import sns
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw.client import (
    ACCESS_KEY_ERROR_CODES,
    BotoCoreError,
    ClientError,
    error_code,
    error_status,
)

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
        ca_location=params.get("ca_location") or "",
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
    if topic["ca_location"]:
        attributes["ca-location"] = topic["ca_location"]
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
        ca_location=args.get("ca-location", ""),
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


# ---------------------------------------------------------------------------------------------------------------
# Topics (SNS API of RGW)


def find_topic(rgw, name):
    """The topic called ``name`` as (arn, GetTopicAttributes ``Attributes``), or (None, None).

    RGW 16.2's ListTopics also lists internal ``<notification id>_<topic>`` entries under the topic's own ARN,
    and keeps them after DeleteTopic: a listed ARN is only a candidate until GetTopicAttributes confirms it.
    """
    candidates = []
    try:
        next_token = None
        while True:
            arns, next_token = sns.list_topics(rgw, next_token)
            for arn in arns:
                if arn.rsplit(":", 1)[-1] == name and arn not in candidates:
                    candidates.append(arn)
            if not next_token:
                break
    except (BotoCoreError, ClientError) as exc:
        raise _topic_read_error(exc, "list topics", rgw)
    for arn in candidates:
        try:
            return arn, sns.get_topic_attributes(rgw, arn)
        except ClientError as exc:
            if error_code(exc) in ("NotFound", "NoSuchEntity", "NoSuchKey") or error_status(exc) == 404:
                continue
            raise _topic_read_error(exc, "read topic %s" % name, rgw)
        except BotoCoreError as exc:
            raise rgw.failure(exc, "read topic %s" % name)
    return None, None


def _topic_read_error(exc, action, rgw):
    """RGW 16.2 answers 403 to every topic read over plain http once any topic stores a password: say so."""
    error = rgw.failure(exc, action)
    if (error_status(exc) == 403 and error_code(exc) not in ACCESS_KEY_ERROR_CODES
            and rgw.endpoint_url.lower().startswith("http://")):
        error.msg += ("; RGW also refuses topic reads over http when a topic stores push_endpoint credentials "
                      "(use an https endpoint_url)")
    return error


def create_topic(rgw, name, topic):
    """Create or update (RGW's CreateTopic overwrites) a topic; returns its ARN."""
    try:
        return sns.create_topic(rgw, name, topic_create_attributes(topic))
    except ClientError as exc:
        endpoint_url = rgw.endpoint_url
        if (error_status(exc) == 400 and endpoint_url.lower().startswith("http://")
                and url_has_credentials(topic["push_endpoint"])):
            raise PublisherError(
                "RGW refused the topic: credentials in push_endpoint must be sent over HTTPS to RGW "
                "(endpoint_url is %s); use an https endpoint_url or a push_endpoint without user:password"
                % endpoint_url)
        raise rgw.failure(exc, "create topic %s" % name)
    except BotoCoreError as exc:
        raise rgw.failure(exc, "create topic %s" % name)


def delete_topic(rgw, arn):
    try:
        sns.delete_topic(rgw, arn)
    except (BotoCoreError, ClientError) as exc:
        raise rgw.failure(exc, "delete topic %s" % arn)


# ---------------------------------------------------------------------------------------------------------------
# What the module does


def ensure_topic(rgw, params, check_mode):
    """rgw_topic: create, update (CreateTopic again: RGW overwrites) or delete one topic; returns the result."""
    name = params["name"]
    arn, attributes = find_topic(rgw, name)
    current = topic_from_attributes(attributes) if attributes is not None else None
    if params["state"] == "absent":
        if current is not None and not check_mode:
            delete_topic(rgw, arn)
        return dict(changed=current is not None, name=name, arn=arn, notifications_need_refresh=False,
                    diff=dict(before=masked_topic(current), after=None))

    desired = desired_topic(params)
    differences = topic_differences(current, desired) if current is not None else sorted(desired)
    if current is not None and not differences:
        if desired["persistent"] and not check_mode:
            # The same attributes again: nothing about the topic changes, but RGW makes the topic's queue (a RADOS
            # object named after the topic alone) if it is missing. On RGW 16.2 any user's DeleteTopic of that name,
            # from any tenant, removes the queue and leaves the topic: every upload into the bucket is then refused
            # (InvalidArgument) until this call. See docs/operator-guide.md, "Rights".
            create_topic(rgw, name, desired)
        return dict(changed=False, name=name, arn=arn, topic=masked_topic(current), changed_attributes=[],
                    notifications_need_refresh=False, diff=dict(before=masked_topic(current),
                                                                after=masked_topic(current)))
    if check_mode:
        arn = arn or topic_arn_for(name, params.get("region") or "default")
    else:
        arn = create_topic(rgw, name, desired)
    return dict(
        changed=True, name=name, arn=arn, topic=masked_topic(desired), changed_attributes=differences,
        # RGW applies a topic's new attributes only to notifications created after the change.
        notifications_need_refresh=current is not None,
        diff=dict(before=masked_topic(current), after=masked_topic(desired)),
    )
