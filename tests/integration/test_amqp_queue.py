"""amqp_queue against the local stack's real RabbitMQ, run through ansible as an operator does."""
import json
import socket
import time
import urllib.parse
import urllib.request

import pytest

from helpers import management_auth, run_module

MODULE = "infn_cloud.cvmfs_publisher.amqp_queue"
CONNECTION = dict(api_url="{{ cvmfs_publisher_rabbitmq_api_url }}", login_user="{{ cvmfs_publisher_rabbitmq_user }}",
                  login_password_file="{{ cvmfs_publisher_rabbitmq_password_file }}")


class Management(object):
    """Just enough of the management API to look behind the module's back."""

    def __init__(self, stack):
        self.url = stack["RABBITMQ_API_URL"]
        self.auth = management_auth(stack, "admin")

    def call(self, method, path, body=None):
        request = urllib.request.Request(self.url + path, method=method,
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Authorization": self.auth, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                content = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
        return json.loads(content) if content else {}

    def queue(self, name):
        return self.call("GET", "/api/queues/%2F/" + urllib.parse.quote(name, safe=""))

    def routing_keys(self, exchange, queue):
        return sorted(b["routing_key"] for b in self.call("GET", "/api/bindings/%%2F/e/%s/q/%s" % (exchange, queue)))

    def publish(self, exchange, routing_key):
        answer = self.call("POST", "/api/exchanges/%%2F/%s/publish" % exchange,
                           {"properties": {"delivery_mode": 2}, "routing_key": routing_key, "payload": "event",
                            "payload_encoding": "string"})
        assert answer["routed"], "the message was not routed to the queue"

    def wait_for_messages(self, queue):
        """The management statistics lag the queue by a few seconds: poll until they show the message."""
        for _ in range(120):
            if (self.queue(queue) or {}).get("messages"):
                return
            time.sleep(0.5)
        pytest.fail("the management API never reported the message published to %s" % queue)


@pytest.fixture(scope="module")
def management(stack):
    return Management(stack)


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_create_then_idempotent(stack, management, unique_name):
    dlq = unique_name + "-dead"
    args = dict(CONNECTION, name=unique_name, delivery_limit=5, dead_letter_exchange=unique_name + "-dlx",
                dead_letter_queue=dlq, dead_letter_strategy="at-least-once")
    rc, result = run_module(MODULE, args, diff=True)
    assert rc == 0 and result["changed"], result
    assert result["messages"] == 0 and result["routing_key"] == unique_name
    assert result["diff"]["before"] is None
    queue = management.queue(unique_name)
    assert queue["durable"] and queue["type"] == "quorum"
    assert queue["arguments"] == {"x-queue-type": "quorum", "x-single-active-consumer": True,
                                  "x-dead-letter-exchange": unique_name + "-dlx", "x-dead-letter-routing-key": dlq,
                                  "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish",
                                  "x-delivery-limit": 5}
    assert management.routing_keys("notification", unique_name) == [unique_name]
    assert management.queue(dlq)["type"] == "quorum"
    assert management.routing_keys(unique_name + "-dlx", dlq) == [dlq]

    rc, again = run_module(MODULE, args, diff=True)
    assert rc == 0 and again["changed"] is False, again
    assert again["diff"]["before"]["arguments"] == again["diff"]["after"]["arguments"]


def test_check_mode_predicts_and_declares_nothing(management, unique_name):
    rc, result = run_module(MODULE, dict(CONNECTION, name=unique_name), check=True, diff=True)
    assert rc == 0 and result["changed"], result
    assert "declare durable quorum queue '%s'" % unique_name in result["actions"]
    assert management.queue(unique_name) is None
    rc, real = run_module(MODULE, dict(CONNECTION, name=unique_name))
    assert rc == 0 and real["changed"] and management.queue(unique_name) is not None
    rc, check_again = run_module(MODULE, dict(CONNECTION, name=unique_name), check=True)
    assert rc == 0 and check_again["changed"] is False


def test_new_routing_key_adds_a_binding_and_keeps_the_old_one(management, unique_name):
    assert run_module(MODULE, dict(CONNECTION, name=unique_name))[1]["changed"]
    rc, result = run_module(MODULE, dict(CONNECTION, name=unique_name, routing_key=unique_name + ".extra"), diff=True)
    assert rc == 0 and result["changed"], result
    assert result["diff"]["before"]["binding"] is None
    assert management.routing_keys("notification", unique_name) == [unique_name, unique_name + ".extra"]


def test_existing_queue_with_other_arguments_fails_naming_each(management, unique_name):
    assert run_module(MODULE, dict(CONNECTION, name=unique_name, single_active_consumer=False))[1]["changed"]
    rc, result = run_module(MODULE, dict(CONNECTION, name=unique_name, delivery_limit=3))
    assert rc != 0 and result["failed"]
    assert result["msg"].startswith("queue '%s' exists with x-delivery-limit=(unset), asked 3; "
                                    "x-single-active-consumer=false, asked true" % unique_name), result["msg"]
    assert management.queue(unique_name)["arguments"] == {"x-queue-type": "quorum"}


def test_delete_refuses_messages_unless_forced(management, unique_name):
    assert run_module(MODULE, dict(CONNECTION, name=unique_name))[1]["changed"]
    management.publish("notification", unique_name)
    management.wait_for_messages(unique_name)

    rc, result = run_module(MODULE, dict(CONNECTION, name=unique_name, state="absent"))
    assert rc != 0 and result["msg"].startswith("queue '%s' holds 1 messages: not deleting it" % unique_name)
    assert management.queue(unique_name) is not None

    rc, checked = run_module(MODULE, dict(CONNECTION, name=unique_name, state="absent", force=True), check=True)
    assert rc == 0 and checked["changed"] and management.queue(unique_name) is not None

    rc, forced = run_module(MODULE, dict(CONNECTION, name=unique_name, state="absent", force=True), diff=True)
    assert rc == 0 and forced["changed"] and forced["messages"] == 1
    assert forced["diff"]["after"] is None and forced["diff"]["before"]["queue"] == unique_name
    assert management.queue(unique_name) is None
    assert management.routing_keys("notification", unique_name) == []


def test_delete_empty_queue_then_absent_is_unchanged(management, unique_name):
    assert run_module(MODULE, dict(CONNECTION, name=unique_name))[1]["changed"]
    rc, result = run_module(MODULE, dict(CONNECTION, name=unique_name, state="absent"))
    assert rc == 0 and result["changed"] and management.queue(unique_name) is None
    rc, again = run_module(MODULE, dict(CONNECTION, name=unique_name, state="absent"))
    assert rc == 0 and again["changed"] is False
    assert management.call("GET", "/api/exchanges/%2F/notification")["type"] == "topic"  # shared: never deleted


def test_rabbitmq_unreachable(unique_name):
    port = closed_port()
    rc, result = run_module(MODULE, dict(CONNECTION, name=unique_name, api_url="http://127.0.0.1:%d" % port))
    assert rc != 0
    assert result["msg"].startswith("RabbitMQ management API unreachable at http://127.0.0.1:%d: " % port)


def test_wrong_password_is_refused_and_never_shown(stack, unique_name):
    args = dict(CONNECTION, name=unique_name, login_password="not-the-Password-7")
    del args["login_password_file"]
    rc, result = run_module(MODULE, args)
    assert rc != 0
    assert result["msg"] == ("RabbitMQ refused login as '%s' at %s: check login_user and login_password "
                             "(HTTP 401)" % (stack["RABBITMQ_API_USER"], stack["RABBITMQ_API_URL"]))
    assert "not-the-Password-7" not in json.dumps(result)
