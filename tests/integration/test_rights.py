"""Least privilege on the stack's broker: each identity of devstack/rights.py does its job and is refused the rest.

The real RabbitMQ of the stack decides; every refusal is asserted on the broker's own words (AMQP 403
ACCESS_REFUSED naming the resource and the user) or on the module's message naming the user and the right.
"""
import json
import urllib.error
import urllib.request

import pika
import pika.exceptions
import pytest

from helpers import amqp_parameters, broker_credentials, consumer_e2e, management_auth, run_module

MODULE = "infn_cloud.cvmfs_publisher.amqp_queue"
DELIVERY_WAIT = 60  # seconds: a bound on polling, not a threshold


def refused(stack, identity, action):
    """Run ``action(channel)`` as ``identity``; return the broker's refusal text (fails if it was allowed)."""
    connection = pika.BlockingConnection(amqp_parameters(stack, identity))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as closed:
            action(channel)
    finally:
        if connection.is_open:
            connection.close()
    assert closed.value.reply_code == 403, closed.value
    return closed.value.reply_text


def access_refused(kind, name, user):
    return "ACCESS_REFUSED - access to %s '%s' in vhost '/' refused for user '%s'" % (kind, name, user)


def publish(exchange, routing_key, body=b"{}"):
    return lambda channel: channel.basic_publish(exchange, routing_key, body, pika.BasicProperties(delivery_mode=2),
                                                 mandatory=True)


@pytest.fixture
def admin_channel(stack):
    connection = pika.BlockingConnection(amqp_parameters(stack, "admin"))
    yield connection.channel()
    connection.close()


@pytest.fixture
def provisioning_queue(stack, unique_name, admin_channel):
    """A provisioning queue bound to the provisioning exchange by the daemon's own code, as the daemon user."""
    queue = "publisher-" + unique_name
    broker = consumer_e2e()._broker(stack, unique_name + ".dlq")
    try:
        assert broker.ensure_queue(queue) is None
        assert broker.ensure_exchange_binding(stack["AMQP_PROVISIONING_EXCHANGE"], queue) is None
    finally:
        broker.close()
    yield queue
    admin_channel.queue_delete(queue)
    admin_channel.queue_delete(unique_name + ".dlq")


def test_dashboard_announces_on_the_provisioning_exchange_only(stack, provisioning_queue, admin_channel, unique_name):
    user = stack["AMQP_DASHBOARD_USER"]
    request = json.dumps({"version": 1, "repository": unique_name + ".infn.it", "owner": unique_name,
                          "subject": "s", "kind": "personal"}).encode()
    connection = pika.BlockingConnection(amqp_parameters(stack, "dashboard"))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(stack["AMQP_PROVISIONING_EXCHANGE"], provisioning_queue, request,
                              pika.BasicProperties(delivery_mode=2), mandatory=True)
    finally:
        connection.close()
    method, _, body = admin_channel.basic_get(provisioning_queue, auto_ack=True)
    assert method is not None and body == request

    # Not into a repository's queue through the default exchange, not as an RGW event, nothing declared or read.
    assert refused(stack, "dashboard", publish("", unique_name)) == access_refused("exchange", "amq.default", user)
    assert refused(stack, "dashboard", publish(stack["AMQP_EXCHANGE"], unique_name)) == \
        access_refused("exchange", stack["AMQP_EXCHANGE"], user)
    assert refused(stack, "dashboard", lambda ch: ch.queue_declare(unique_name, durable=True)) == \
        access_refused("queue", unique_name, user)
    assert refused(stack, "dashboard", lambda ch: ch.basic_consume(provisioning_queue, lambda *a: None)) == \
        access_refused("queue", provisioning_queue, user)


def test_rgw_identity_may_only_publish_events(stack, provisioning_queue, admin_channel, unique_name):
    """guest keeps RGW 16.2's default password, so it must be worth nothing but publishing bucket events."""
    user = stack["AMQP_RGW_USER"]
    admin_channel.queue_declare(unique_name, exclusive=True)
    admin_channel.queue_bind(unique_name, stack["AMQP_EXCHANGE"], routing_key=unique_name)
    connection = pika.BlockingConnection(amqp_parameters(stack, "rgw"))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(stack["AMQP_EXCHANGE"], unique_name, b'{"Records": []}', mandatory=True)
    finally:
        connection.close()
    assert admin_channel.basic_get(unique_name, auto_ack=True)[2] == b'{"Records": []}'

    assert refused(stack, "rgw", publish(stack["AMQP_PROVISIONING_EXCHANGE"], provisioning_queue)) == \
        access_refused("exchange", stack["AMQP_PROVISIONING_EXCHANGE"], user)
    assert refused(stack, "rgw", publish("", provisioning_queue)) == access_refused("exchange", "amq.default", user)
    assert refused(stack, "rgw", lambda ch: ch.basic_consume(provisioning_queue, lambda *a: None)) == \
        access_refused("queue", provisioning_queue, user)
    assert refused(stack, "rgw", lambda ch: ch.queue_declare(unique_name + "-rgw", durable=True)) == \
        access_refused("queue", unique_name + "-rgw", user)
    # No management API either (guest lost RabbitMQ's default administrator tag).
    request = urllib.request.Request(stack["RABBITMQ_API_URL"] + "/api/queues",
                                     headers={"Authorization": management_auth(stack, "rgw")})
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(request, timeout=30)
    assert denied.value.code == 401


def test_daemon_cannot_forge_events_nor_requests_nor_touch_the_exchanges(stack, provisioning_queue, unique_name):
    user = stack["AMQP_USER"]
    assert refused(stack, "daemon", publish(stack["AMQP_EXCHANGE"], unique_name)) == \
        access_refused("exchange", stack["AMQP_EXCHANGE"], user)
    assert refused(stack, "daemon", publish(stack["AMQP_PROVISIONING_EXCHANGE"], provisioning_queue)) == \
        access_refused("exchange", stack["AMQP_PROVISIONING_EXCHANGE"], user)
    assert refused(stack, "daemon", lambda ch: ch.exchange_delete(stack["AMQP_EXCHANGE"])) == \
        access_refused("exchange", stack["AMQP_EXCHANGE"], user)


def test_management_user_manages_repository_queues_only(stack, admin_channel, unique_name):
    user, _ = broker_credentials(stack, "api")
    connection = dict(api_url="{{ cvmfs_publisher_rabbitmq_api_url }}",
                      login_user="{{ cvmfs_publisher_rabbitmq_user }}",
                      login_password_file="{{ cvmfs_publisher_rabbitmq_password_file }}")
    rc, result = run_module(MODULE, dict(connection, name=unique_name))
    assert rc == 0 and result["changed"], result
    # The daemon's own queues are out of its reach: the module says who lacks which right.
    rc, result = run_module(MODULE, dict(connection, name="publisher"))
    assert rc != 0
    assert result["msg"].startswith("RabbitMQ user '%s' lacks the 'configure' permission on queue 'publisher' on "
                                    "vhost '/' (PUT /api/queues/%%2F/publisher refused, HTTP 401" % user), result["msg"]
    # It reads and binds, but cannot publish anywhere: no forged event, no provisioning request.
    assert refused(stack, "api", publish(stack["AMQP_EXCHANGE"], unique_name)) == \
        access_refused("exchange", stack["AMQP_EXCHANGE"], user)
    assert refused(stack, "api", publish("", unique_name)) == access_refused("exchange", "amq.default", user)
    admin_channel.queue_delete(unique_name)


def test_module_without_the_management_tag_names_the_identity(stack, unique_name):
    """The dashboard's user is no management user: the module says so instead of blaming the password."""
    user, _ = broker_credentials(stack, "dashboard")
    rc, result = run_module(MODULE, dict(api_url=stack["RABBITMQ_API_URL"], login_user=user,
                                         login_password_file=stack["AMQP_DASHBOARD_PASSWORD_FILE"], name=unique_name))
    assert rc != 0
    assert result["msg"].startswith("RabbitMQ user '%s' lacks the 'management' user tag (or any permission on "
                                    "the vhost) on vhost '/'" % user), result["msg"]
