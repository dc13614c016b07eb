#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: rgw_bucket_notification
short_description: Add, update or remove one notification of a Ceph RGW bucket, leaving the others alone
version_added: 0.1.0
description:
  - Merges one notification, identified by O(id), into the notification configuration of O(bucket); events under
    O(prefix) (and ending in O(suffix)) are sent to the topic O(topic_arn). Notifications with other Ids are kept
    as they are.
  - Idempotent; the current and the asked notification are compared after normalisation (events sorted and
    deduplicated, filter rule names case-insensitive) and the configuration is written only when they differ.
  - With O(state=absent) only O(id) is removed, with RGW's C(DELETE /<bucket>?notification=<id>) extension, because
    RGW 16.2 merges a PutBucketNotificationConfiguration into the existing configuration instead of replacing it,
    and refuses an empty one with C(MalformedXML).
  - RGW 16.2 keeps one entry per Id and topic, so when O(topic_arn) changes the old entry is deleted before the
    new one is written; events in between are not notified.
  - A missing bucket is an error that names it with O(state=present); with O(state=absent) there is nothing to
    remove and the module reports no change (RV(bucket_exists=false)).
extends_documentation_fragment:
  - infn_cloud.cvmfs_publisher.rgw
  - infn_cloud.cvmfs_publisher.batch
attributes:
  check_mode:
    support: full
    description: Reports whether the notification would be added, changed or removed.
  diff_mode:
    support: full
    description: Before and after of notification O(id) (other Ids are not shown).
  action_group:
    support: full
    description: >-
      Use C(group/infn_cloud.cvmfs_publisher.rgw) or C(group/infn_cloud.cvmfs_publisher.all) in C(module_defaults)
      to set its connection options once.
    membership:
      - infn_cloud.cvmfs_publisher.rgw
      - infn_cloud.cvmfs_publisher.all
options:
  bucket:
    description:
      - Bucket name; by convention the repository's short name.
    type: str
    required: true
  id:
    description:
      - Id of the notification this module manages in the bucket's configuration.
    type: str
    default: cvmfs-publisher
  state:
    description:
      - V(present) adds or updates notification O(id); V(absent) removes it.
    type: str
    choices: [present, absent]
    default: present
  topic_arn:
    description:
      - ARN of the topic that receives the events (RV(infn_cloud.cvmfs_publisher.rgw_topic#module:arn)).
      - Required when O(state=present).
    type: str
  events:
    description:
      - S3 event types to notify.
    type: list
    elements: str
    default: ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]
  prefix:
    description:
      - Only keys starting with this prefix are notified; V("") for every key.
    type: str
    default: cvmfs/
  suffix:
    description:
      - Only keys ending with this suffix are notified.
    type: str
notes:
  - After a topic's attributes change, RGW keeps using the old ones for existing notifications; re-create them
    (O(state=absent) then O(state=present)) when M(infn_cloud.cvmfs_publisher.rgw_topic) returns
    C(notifications_need_refresh=true).
seealso:
  - module: infn_cloud.cvmfs_publisher.rgw_topic
    description: Creates the topic the notification points to.
  - module: community.aws.s3_bucket_notification
    description: The AWS counterpart, with the same merge-by-Id behaviour.
  - name: Ceph bucket notifications
    description: S3 bucket notification API of RGW, including the delete extension.
    link: https://docs.ceph.com/en/pacific/radosgw/s3-notification-compatibility/
author:
  - cvmfs-publisher developers (@infn-cloud)
"""

EXAMPLES = r"""
- name: Notify topic alice of every change under cvmfs/ in bucket alice
  infn_cloud.cvmfs_publisher.rgw_bucket_notification:
    endpoint_url: https://rgw.example.org
    access_key_file: /etc/cvmfs-publisher/rgw.access
    secret_key_file: /etc/cvmfs-publisher/rgw.secret
    bucket: alice
    topic_arn: "arn:aws:sns:default::alice"

- name: Only tarballs, on another Id
  infn_cloud.cvmfs_publisher.rgw_bucket_notification:
    endpoint_url: https://rgw.example.org
    bucket: alice
    id: tarballs
    topic_arn: "arn:aws:sns:default::alice"
    events: ["s3:ObjectCreated:*"]
    suffix: .tar.gz

- name: Stop notifying the publisher, other notifications stay
  infn_cloud.cvmfs_publisher.rgw_bucket_notification:
    endpoint_url: https://rgw.example.org
    bucket: alice
    state: absent
"""

RETURN = r"""
bucket:
  description: Bucket name.
  returned: always
  type: str
  sample: alice
id:
  description: Id of the managed notification.
  returned: always
  type: str
  sample: cvmfs-publisher
notification:
  description: The managed notification after the run (normalised); null when absent.
  returned: always
  type: dict
  sample:
    id: cvmfs-publisher
    topic_arn: "arn:aws:sns:default::alice"
    events: ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]
    prefix: cvmfs/
    suffix: ""
bucket_exists:
  description: Whether the bucket exists (only O(state=absent) accepts a missing bucket).
  returned: always
  type: bool
  sample: true
other_ids:
  description: Ids of the bucket's other notifications, left untouched.
  returned: always
  type: list
  elements: str
  sample: [tarballs]
"""

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._module import PublisherError, PublisherModule
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._naming import (
    DEFAULT_NOTIFICATION_ID,
    DEFAULT_PREFIX,
)
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw.client import (
    RGW_ARGUMENT_SPEC,
    RGW_MUTUALLY_EXCLUSIVE,
    Connection,
)
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw.notification import (
    ensure_bucket_notification,
)

ARGUMENT_SPEC = dict(
    bucket=dict(type="str", required=True),
    id=dict(type="str", default=DEFAULT_NOTIFICATION_ID),
    state=dict(type="str", choices=["present", "absent"], default="present"),
    topic_arn=dict(type="str"),
    events=dict(type="list", elements="str", default=["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]),
    prefix=dict(type="str", default=DEFAULT_PREFIX),
    suffix=dict(type="str"),
)


def run(module):
    if module.params["state"] == "present" and not module.params["events"]:
        raise PublisherError("events must list at least one S3 event type (for example s3:ObjectCreated:*)")
    return ensure_bucket_notification(module.client(Connection), module.params, module.check_mode)


def main():
    module = PublisherModule(
        ARGUMENT_SPEC,
        batch=True,
        option_sets=(RGW_ARGUMENT_SPEC,),
        mutually_exclusive=RGW_MUTUALLY_EXCLUSIVE,
        required_if=[("state", "present", ["topic_arn"])],
    )
    module.run(run)


if __name__ == "__main__":
    main()
