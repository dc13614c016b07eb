#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: amqp_queue
short_description: Declare a repository's durable quorum queue bound to the notification exchange
version_added: 0.1.0
description:
  - Declares, through the RabbitMQ management HTTP API, the durable topic exchange RGW publishes to
    (O(exchange)), a durable B(quorum) queue O(name) and its binding by O(routing_key).
  - Optionally declares a dead-letter exchange and a durable quorum dead-letter queue bound to it, and points the
    queue at them.
  - RabbitMQ cannot change the arguments of an existing queue. When O(name) exists with other arguments or
    durability, the module fails and names every difference with both values; it never deletes or re-creates a
    queue on its own. Bindings other than the one asked are left alone.
  - With O(state=absent) the queue is deleted only when it is empty (its bindings go with it), unless O(force=true).
    Exchanges and the dead-letter queue are shared and are never deleted.
extends_documentation_fragment:
  - infn_cloud.cvmfs_publisher.rabbitmq
  - infn_cloud.cvmfs_publisher.batch
attributes:
  check_mode:
    support: full
    description: Reports what would be declared or deleted, and fails on the same conflicts as a real run.
  diff_mode:
    support: full
    description: Before and after of the queue's durability, arguments and binding.
  action_group:
    support: full
    description: >-
      Use C(group/infn_cloud.cvmfs_publisher.amqp) or C(group/infn_cloud.cvmfs_publisher.all) in C(module_defaults)
      to set its connection options once.
    membership:
      - infn_cloud.cvmfs_publisher.amqp
      - infn_cloud.cvmfs_publisher.all
options:
  name:
    description:
      - Queue name; by convention the repository's short name (C(alice) for C(alice.infn.it)).
    type: str
    required: true
  state:
    description:
      - V(present) declares what is missing; V(absent) deletes the queue.
    type: str
    choices: [present, absent]
    default: present
  exchange:
    description:
      - Durable topic exchange the queue is bound to; RGW topics publish to it (its C(amqp_exchange)).
    type: str
    default: notification
  routing_key:
    description:
      - Routing key of the binding; RGW uses the topic name, so the default is O(name).
    type: str
  single_active_consumer:
    description:
      - Sets C(x-single-active-consumer), so only one consumer at a time receives the queue's messages
        (one writer per repository).
    type: bool
    default: true
  delivery_limit:
    description:
      - Sets C(x-delivery-limit), the number of redeliveries before a message is dead-lettered or dropped.
    type: int
  dead_letter_exchange:
    description:
      - Sets C(x-dead-letter-exchange) and declares it as a durable topic exchange when missing.
    type: str
  dead_letter_queue:
    description:
      - Declares this durable quorum queue when missing, binds it to O(dead_letter_exchange) with its own name as
        routing key, and sets C(x-dead-letter-routing-key) to it.
      - An existing dead-letter queue is only checked for being a durable quorum queue, as it may be shared.
    type: str
  dead_letter_strategy:
    description:
      - Sets C(x-dead-letter-strategy). V(at-least-once) also sets C(x-overflow=reject-publish), which RabbitMQ
        requires for it.
    type: str
    choices: [at-most-once, at-least-once]
  force:
    description:
      - With O(state=absent), delete the queue even when it holds messages (they are lost).
    type: bool
    default: false
notes:
  - The message count checked by O(state=absent) comes from the management statistics, which the broker
    refreshes every few seconds.
seealso:
  - module: infn_cloud.cvmfs_publisher.rgw_topic
    description: The RGW topic whose AMQP push endpoint publishes to O(exchange) with the topic name as key.
  - module: community.rabbitmq.rabbitmq_queue
    description: General-purpose queue management through the same API.
  - name: RabbitMQ quorum queues
    description: Arguments, dead-lettering strategies and delivery limits of quorum queues.
    link: https://www.rabbitmq.com/docs/quorum-queues
author:
  - cvmfs-publisher developers (@infn-cloud)
"""

EXAMPLES = r"""
- name: Queue of repository alice.infn.it, with a shared dead-letter queue
  infn_cloud.cvmfs_publisher.amqp_queue:
    api_url: https://rabbitmq.example.org:15671
    login_user: publisher-admin
    login_password_file: /etc/cvmfs-publisher/rabbitmq.password
    name: alice
    delivery_limit: 5
    dead_letter_exchange: notification.dead
    dead_letter_queue: dead-letters
    dead_letter_strategy: at-least-once

- name: Connection options once for every amqp module
  module_defaults:
    group/infn_cloud.cvmfs_publisher.amqp:
      api_url: "{{ cvmfs_publisher_rabbitmq_api_url }}"
      login_user: "{{ cvmfs_publisher_rabbitmq_user }}"
      login_password_file: "{{ cvmfs_publisher_rabbitmq_password_file }}"
  block:
    - name: Remove the queue of bob once it is drained
      infn_cloud.cvmfs_publisher.amqp_queue:
        name: bob
        state: absent
"""

RETURN = r"""
queue:
  description: Name of the queue.
  returned: always
  type: str
  sample: alice
exchange:
  description: Exchange the queue is bound to.
  returned: when O(state=present)
  type: str
  sample: notification
routing_key:
  description: Routing key of the binding.
  returned: when O(state=present)
  type: str
  sample: alice
arguments:
  description: The queue's arguments as asked (and, when it existed, as it has them).
  returned: when O(state=present)
  type: dict
  sample: {"x-queue-type": "quorum", "x-single-active-consumer": true, "x-delivery-limit": 5}
durable:
  description: Whether the queue is durable (always true).
  returned: when O(state=present)
  type: bool
  sample: true
dead_letter_exchange:
  description: The dead-letter exchange, if any.
  returned: when O(state=present)
  type: str
  sample: notification.dead
dead_letter_queue:
  description: The dead-letter queue, if any.
  returned: when O(state=present)
  type: str
  sample: dead-letters
messages:
  description: Messages in the queue (management statistics) when it exists; 0 right after creation.
  returned: when the queue exists
  type: int
  sample: 0
actions:
  description: What was (or, in check mode, would be) declared or bound.
  returned: when O(state=present)
  type: list
  elements: str
  sample:
    - declare durable quorum queue 'alice'
    - bind queue 'alice' to exchange 'notification' with routing key 'alice'
"""

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._module import PublisherModule
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._naming import DEFAULT_EXCHANGE
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rabbitmq import (
    RABBITMQ_ARGUMENT_SPEC,
    RABBITMQ_MUTUALLY_EXCLUSIVE,
    ManagementApi,
    ensure_queue_absent,
    ensure_queue_present,
)

ARGUMENT_SPEC = dict(
    name=dict(type="str", required=True),
    state=dict(type="str", choices=["present", "absent"], default="present"),
    exchange=dict(type="str", default=DEFAULT_EXCHANGE),
    routing_key=dict(type="str", no_log=False),
    single_active_consumer=dict(type="bool", default=True),
    delivery_limit=dict(type="int"),
    dead_letter_exchange=dict(type="str"),
    dead_letter_queue=dict(type="str"),
    dead_letter_strategy=dict(type="str", choices=["at-most-once", "at-least-once"]),
    force=dict(type="bool", default=False),
)


def run(module):
    api = module.client(ManagementApi)
    if module.params["state"] == "absent":
        result = ensure_queue_absent(api, module.params, module.check_mode)
    else:
        result = ensure_queue_present(api, module.params, module.check_mode)
    return result


def main():
    module = PublisherModule(
        ARGUMENT_SPEC,
        batch=True,
        option_sets=(RABBITMQ_ARGUMENT_SPEC,),
        mutually_exclusive=RABBITMQ_MUTUALLY_EXCLUSIVE,
        required_by={"dead_letter_queue": "dead_letter_exchange", "dead_letter_strategy": "dead_letter_exchange"},
    )
    module.run(run)


if __name__ == "__main__":
    main()
