# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""RGW bucket notifications (its S3 API): normalisation and merging, the calls (signed requests with the XML boto3
would send and read: its S3 client is about 0.2 s of start-up), and ``rgw_bucket_notification``'s ensure logic.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from xml.etree import ElementTree

try:
    from urllib.parse import quote
except ImportError:  # pragma: no cover - Python 2 module machinery only
    from urllib import quote  # noqa

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._module import PublisherError
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw import answers
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw.client import (
    BotoCoreError,
    ClientError,
    error_code,
    retried_request,
)

# ---------------------------------------------------------------------------------------------------------------
# Pure logic


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


# ---------------------------------------------------------------------------------------------------------------
# Bucket notifications (S3 API of RGW)


S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
# A filter's sections: the XML element and the name in a TopicConfiguration (boto3's ``Key``; RGW's own metadata and
# tag filters, which boto3 does not know, named alike). All three are read and written back, so that another Id's
# filters survive the Put that merges this one in.
FILTER_SECTIONS = (("S3Key", "Key"), ("S3Metadata", "Metadata"), ("S3Tags", "Tags"))


def bucket_url(rgw, bucket, query):
    return "%s/%s?%s" % (rgw.endpoint_url.rstrip("/"), quote(bucket, safe=""), query)


def parse_topic_configurations(content):
    """GetBucketNotificationConfiguration's XML -> its TopicConfigurations as boto3 returns them: ``Id``,
    ``TopicArn`` (the ``Topic`` element), ``Events``, and ``Filter.<section>.FilterRules`` for each section with
    rules (``FILTER_SECTIONS``)."""
    configurations = []
    root = answers.parse(content, "GetBucketNotificationConfiguration", "NotificationConfiguration")
    for element in answers.children(root, "TopicConfiguration"):
        config = {"Id": answers.text(element, "Id"), "TopicArn": answers.text(element, "Topic"),
                  "Events": [event.text or "" for event in answers.children(element, "Event")]}
        for filter_element in answers.children(element, "Filter"):
            for xml_name, name in FILTER_SECTIONS:
                rules = [{"Name": answers.text(rule, "Name"), "Value": answers.text(rule, "Value")}
                         for section in answers.children(filter_element, xml_name)
                         for rule in answers.children(section, "FilterRule")]
                if rules:
                    config.setdefault("Filter", {})[name] = {"FilterRules": rules}
        configurations.append(config)
    return configurations


def notification_configuration_xml(topic_configurations):
    """TopicConfigurations (``clean_topic_configuration``'s form) -> PutBucketNotificationConfiguration's body."""
    root = ElementTree.Element("NotificationConfiguration", xmlns=S3_NS)
    for config in topic_configurations:
        element = ElementTree.SubElement(root, "TopicConfiguration")
        ElementTree.SubElement(element, "Id").text = config["Id"]
        ElementTree.SubElement(element, "Topic").text = config["TopicArn"]
        for event in config.get("Events") or []:
            ElementTree.SubElement(element, "Event").text = event
        sections = config.get("Filter") or {}
        if sections:
            filter_element = ElementTree.SubElement(element, "Filter")
            for xml_name, name in FILTER_SECTIONS:
                if name in sections:
                    section = ElementTree.SubElement(filter_element, xml_name)
                    for rule in sections[name]["FilterRules"]:
                        rule_element = ElementTree.SubElement(section, "FilterRule")
                        ElementTree.SubElement(rule_element, "Name").text = rule["Name"]
                        ElementTree.SubElement(rule_element, "Value").text = rule["Value"]
    return ElementTree.tostring(root, encoding="utf-8")


@retried_request
def _get_configuration(rgw, bucket):
    return rgw.signed_request("GET", bucket_url(rgw, bucket, "notification"),
                              "GetBucketNotificationConfiguration").content


def get_topic_configurations(rgw, bucket, missing_ok=False):
    """The bucket's TopicConfigurations; a missing bucket is an error that names it (None with ``missing_ok``)."""
    action = "read the notification configuration of bucket %s" % bucket
    try:
        return parse_topic_configurations(_get_configuration(rgw, bucket))
    except ClientError as exc:
        if error_code(exc) == "NoSuchBucket":
            if missing_ok:
                return None
            raise PublisherError("bucket '%s' does not exist at %s: create it first (the bucket is the repository's "
                                 "short name)" % (bucket, rgw.endpoint_url))
        raise rgw.failure(exc, action)
    except BotoCoreError as exc:
        raise rgw.failure(exc, action)


@retried_request
def _put_configuration(rgw, bucket, body):
    rgw.signed_request("PUT", bucket_url(rgw, bucket, "notification"), "PutBucketNotificationConfiguration",
                       body=body)


def put_topic_configurations(rgw, bucket, topic_configurations):
    body = notification_configuration_xml([clean_topic_configuration(c) for c in topic_configurations])
    try:
        _put_configuration(rgw, bucket, body)
    except (BotoCoreError, ClientError) as exc:
        raise rgw.failure(exc, "write the notification configuration of bucket %s" % bucket)


def delete_notification(rgw, bucket, notification_id):
    """RGW's ``DELETE /<bucket>?notification=<id>``: removes one notification, others stay.

    The only way to drop a notification on RGW 16.2: a Put merges into the existing configuration instead of
    replacing it, and an empty Put is refused with MalformedXML. (boto3 has no such operation.)
    """
    action = "delete notification %s of bucket %s" % (notification_id, bucket)
    url = bucket_url(rgw, bucket, "notification=" + quote(notification_id, safe=""))
    try:
        rgw.signed_request("DELETE", url, "DeleteBucketNotification")
    except (BotoCoreError, ClientError) as exc:
        raise rgw.failure(exc, action)


def remove_notification(rgw, bucket, notification_id, count):
    """Remove every entry of one Id (RGW 16.2 keeps one per Id and topic), then check that none is left."""
    for _attempt in range(count):
        delete_notification(rgw, bucket, notification_id)
    left = [c for c in get_topic_configurations(rgw, bucket) if c.get("Id") == notification_id]
    if left:
        raise PublisherError("RGW still lists notification %s on bucket %s after deleting it %d times"
                             % (notification_id, bucket, count))


# ---------------------------------------------------------------------------------------------------------------
# What the module does


def ensure_bucket_notification(rgw, params, check_mode):
    """rgw_bucket_notification: merge (or remove) one notification Id, other Ids untouched; returns the result.

    RGW 16.2 merges a Put into the existing configuration (it never drops other Ids) and keys entries by Id and
    topic: putting an Id with another topic adds a second entry, so a topic change first deletes the Id's entries.
    """
    bucket, notification_id = params["bucket"], params["id"]
    absent = params["state"] == "absent"
    configurations = get_topic_configurations(rgw, bucket, missing_ok=absent)
    if configurations is None:  # a bucket that is gone has no notification left to remove
        return dict(changed=False, bucket=bucket, id=notification_id, other_ids=[], notification=None,
                    bucket_exists=False, diff=dict(before=None, after=None))
    mine = [c for c in configurations if c.get("Id") == notification_id]
    current = normalise_notification(mine[0]) if mine else None
    other_ids = sorted(set(c.get("Id", "") for c in configurations) - set([notification_id]))
    result = dict(bucket=bucket, id=notification_id, other_ids=other_ids, bucket_exists=True)
    if absent:
        if mine and not check_mode:
            remove_notification(rgw, bucket, notification_id, len(mine))
        result.update(changed=bool(mine), notification=None, diff=dict(before=current, after=None))
        return result

    desired = desired_notification(params)
    changed = len(mine) != 1 or current != desired
    if changed and not check_mode:
        if len(mine) > 1 or (current and current["topic_arn"] != desired["topic_arn"]):
            remove_notification(rgw, bucket, notification_id, len(mine))
        merged = merge_notification(configurations, notification_id, notification_config(desired))
        put_topic_configurations(rgw, bucket, merged)
    result.update(changed=changed, notification=desired, diff=dict(before=current, after=desired))
    return result
