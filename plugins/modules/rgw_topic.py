#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: rgw_topic
short_description: Create, update or delete a Ceph RGW notification topic with an AMQP push endpoint
version_added: 0.1.0
description:
  - Manages one topic of Ceph RGW's SNS-compatible API whose push endpoint is a RabbitMQ broker; RGW publishes
    every bucket event of the notifications that use the topic to O(amqp_exchange), with the topic name as
    routing key.
  - Idempotent; the topic's attributes (GetTopicAttributes, RGW's C(EndPoint) JSON) are compared with the options
    and the topic is written only when they differ.
  - B(Updating a topic does not update the bucket notifications that use it.) RGW applies the new attributes only
    to notifications created after the change, so every notification using the topic must be re-created (for
    example removed and added again with M(infn_cloud.cvmfs_publisher.rgw_bucket_notification)). The module
    returns RV(notifications_need_refresh=true) when it updated an existing topic.
  - RGW accepts credentials in O(push_endpoint) only when O(endpoint_url) is HTTPS. The push endpoint's password
    is never shown in results or diffs.
extends_documentation_fragment:
  - infn_cloud.cvmfs_publisher.rgw
  - infn_cloud.cvmfs_publisher.batch
attributes:
  check_mode:
    support: full
    description: Reports whether the topic would be created, updated or deleted; the ARN of a new topic is predicted.
  diff_mode:
    support: full
    description: Before and after of the topic's attributes, push endpoint password masked.
  action_group:
    support: full
    description: >-
      Use C(group/infn_cloud.cvmfs_publisher.rgw) or C(group/infn_cloud.cvmfs_publisher.all) in C(module_defaults)
      to set its connection options once.
    membership:
      - infn_cloud.cvmfs_publisher.rgw
      - infn_cloud.cvmfs_publisher.all
options:
  name:
    description:
      - Topic name; by convention the repository's short name (C(alice) for C(alice.infn.it)), which is also the
        routing key of its events.
    type: str
    required: true
  state:
    description:
      - V(present) creates or updates the topic; V(absent) deletes it.
    type: str
    choices: [present, absent]
    default: present
  push_endpoint:
    description:
      - AMQP URL of the broker, V(amqp://host:5672[/vhost]) or V(amqps://user:password@host:5671[/vhost]).
      - Without credentials RGW logs in as guest. With credentials, O(endpoint_url) must be HTTPS.
      - Required when O(state=present).
    type: str
  amqp_exchange:
    description:
      - Exchange RGW publishes to. It must exist (see M(infn_cloud.cvmfs_publisher.amqp_queue)); RGW 16.2 uses one
        exchange per broker, so every topic on a broker should use the same one.
    type: str
    default: notification
  amqp_ack_level:
    description:
      - V(none) does not wait for the broker, V(broker) waits for its ack, V(routable) also waits until a queue
        took the message. V(broker) and V(routable) add about 200 ms to every S3 write on a synchronous topic.
    type: str
    choices: [none, broker, routable]
    default: broker
  verify_ssl:
    description:
      - Whether RGW verifies the broker's certificate for V(amqps://) endpoints.
    type: bool
    default: true
  ca_location:
    description:
      - Path, on the RGW hosts (not on the host running this module), of the PEM bundle of the CAs RGW trusts for
        the broker's certificate of an V(amqps://) O(push_endpoint) (the topic's C(ca-location) attribute).
      - Empty (the default) means RGW's system trust store.
      - RGW checks the broker's DNS name against the certificate (not an IP address), so name the broker by a host
        name its certificate covers.
    type: str
    default: ""
  persistent:
    description:
      - Queue events in RADOS and deliver them asynchronously, so they survive a broker outage (at least once;
        duplicates are possible). RGW 16.2 starts delivering a new persistent topic's events after up to 30 s.
      - V(false) makes RGW push each event synchronously and drop it when the broker is unreachable (the S3 call
        still succeeds), so an event is lost for every upload made while RabbitMQ is down.
      - For a persistent topic whose attributes already match, the module sends them again without reporting a
        change, so that RGW re-creates the topic's event queue if it is missing. On RGW 16.2 any user's
        C(DeleteTopic) of the same name, from any tenant, removes that queue and leaves the topic, and RGW refuses
        every upload into the bucket until the queue exists again.
    type: bool
    default: true
  opaque_data:
    description:
      - Text RGW copies into every event's C(opaqueData) field.
    type: str
    default: ""
notes:
  - RGW 16.2's ListTopics also lists internal C(<notification id>_<topic>) entries under the topic's ARN and keeps
    them after DeleteTopic; the module confirms every candidate with GetTopicAttributes.
seealso:
  - module: infn_cloud.cvmfs_publisher.rgw_bucket_notification
    description: Points a bucket's events at the topic.
  - module: infn_cloud.cvmfs_publisher.amqp_queue
    description: Declares the exchange and the queue the topic's events are routed to.
  - name: Ceph bucket notifications
    description: Topic attributes and the AMQP push endpoint.
    link: https://docs.ceph.com/en/pacific/radosgw/notifications/
author:
  - cvmfs-publisher developers (@infn-cloud)
"""

EXAMPLES = r"""
- name: Topic of repository alice.infn.it
  infn_cloud.cvmfs_publisher.rgw_topic:
    endpoint_url: https://rgw.example.org
    access_key_file: /etc/cvmfs-publisher/rgw.access
    secret_key_file: /etc/cvmfs-publisher/rgw.secret
    name: alice
    push_endpoint: amqps://rgw-events:{{ rgw_events_password }}@rabbitmq.example.org:5671
    amqp_exchange: notification
    amqp_ack_level: broker
    persistent: true
  register: topic

- name: Re-create the notifications of an updated topic
  infn_cloud.cvmfs_publisher.rgw_bucket_notification:
    endpoint_url: https://rgw.example.org
    access_key_file: /etc/cvmfs-publisher/rgw.access
    secret_key_file: /etc/cvmfs-publisher/rgw.secret
    bucket: alice
    topic_arn: "{{ topic.arn }}"
    state: "{{ item }}"
  loop: [absent, present]
  when: topic.notifications_need_refresh

- name: Delete the topic of bob
  infn_cloud.cvmfs_publisher.rgw_topic:
    endpoint_url: https://rgw.example.org
    name: bob
    state: absent
"""

RETURN = r"""
name:
  description: Topic name.
  returned: always
  type: str
  sample: alice
arn:
  description: ARN of the topic (predicted in check mode for a new topic); null when absent.
  returned: always
  type: str
  sample: "arn:aws:sns:default::alice"
topic:
  description: The topic's attributes after the run, push endpoint password masked.
  returned: when O(state=present)
  type: dict
  sample:
    push_endpoint: "amqps://rgw-events:********@rabbitmq.example.org:5671"
    amqp_exchange: notification
    amqp_ack_level: broker
    verify_ssl: true
    ca_location: ""
    persistent: true
    opaque_data: ""
changed_attributes:
  description: Attributes that differed (all of them for a new topic).
  returned: when O(state=present)
  type: list
  elements: str
  sample: [persistent]
notifications_need_refresh:
  description: True when an existing topic was updated; the bucket notifications using it must be re-created for
    the change to take effect.
  returned: always
  type: bool
  sample: false
"""

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._module import PublisherModule
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._naming import DEFAULT_EXCHANGE
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw.client import (
    RGW_ARGUMENT_SPEC,
    RGW_MUTUALLY_EXCLUSIVE,
    Connection,
)
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw.topic import (
    ensure_topic,
    url_password,
)

ARGUMENT_SPEC = dict(
    name=dict(type="str", required=True),
    state=dict(type="str", choices=["present", "absent"], default="present"),
    push_endpoint=dict(type="str", no_log=False),
    amqp_exchange=dict(type="str", default=DEFAULT_EXCHANGE),
    amqp_ack_level=dict(type="str", choices=["none", "broker", "routable"], default="broker"),
    verify_ssl=dict(type="bool", default=True),
    ca_location=dict(type="str", default=""),
    persistent=dict(type="bool", default=True),
    opaque_data=dict(type="str", default=""),
)


def run(module):
    return ensure_topic(module.client(Connection), module.params, module.check_mode)


def main():
    module = PublisherModule(
        ARGUMENT_SPEC,
        batch=True,
        # The push endpoint may carry a broker password: keep it out of every log and of module invocation echoes.
        secrets_of=lambda params: [url_password(params.get("push_endpoint"))],
        option_sets=(RGW_ARGUMENT_SPEC,),
        mutually_exclusive=RGW_MUTUALLY_EXCLUSIVE,
        required_if=[("state", "present", ["push_endpoint"])],
    )
    module.run(run)


if __name__ == "__main__":
    main()
