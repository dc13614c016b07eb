"""module_utils/_rabbitmq.py and amqp_queue without RabbitMQ: pure logic directly, the declare/delete flow against
an in-memory management API, HTTP errors through a patched open_url, and the module's argument handling."""
import io
import json
import socket
from urllib.error import HTTPError, URLError

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _rabbitmq as mq
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._module import PublisherError
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.modules import amqp_queue

API = "http://127.0.0.1:15672"


def queue_params(**overrides):
    base = dict(api_url=API, login_user="guest", login_password="guest", login_password_file=None, vhost="/",
                ca_cert=None, validate_certs=True, timeout=5, name="alice", state="present",
                exchange="notification", routing_key=None, single_active_consumer=True, delivery_limit=None,
                dead_letter_exchange=None, dead_letter_queue=None, dead_letter_strategy=None, force=False)
    base.update(overrides)
    return base


# -- pure logic ---------------------------------------------------------------------------------------------------

def test_queue_arguments_for_every_option():
    assert mq.queue_arguments() == {"x-queue-type": "quorum"}
    assert mq.queue_arguments(single_active_consumer=True, dead_letter_exchange="dlx", dead_letter_queue="dead",
                              dead_letter_strategy="at-least-once", delivery_limit=5) == {
        "x-queue-type": "quorum", "x-single-active-consumer": True, "x-dead-letter-exchange": "dlx",
        "x-dead-letter-routing-key": "dead", "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish", "x-delivery-limit": 5}
    assert "x-overflow" not in mq.queue_arguments(dead_letter_exchange="dlx", dead_letter_strategy="at-most-once")


def test_existing_queue_differences_are_named_with_both_values():
    existing = {"durable": False, "type": "quorum",
                "arguments": {"x-queue-type": "quorum", "x-max-length": 1000}}
    differences = mq.queue_differences(existing, mq.queue_arguments(single_active_consumer=True, delivery_limit=5))
    assert mq.describe_differences("queue", "alice", differences) == (
        "queue 'alice' exists with durable=false, asked true; x-delivery-limit=(unset), asked 5; "
        "x-max-length=1000, asked (unset); x-single-active-consumer=false, asked true")


def test_absent_single_active_consumer_equals_false_and_classic_type_is_seen():
    existing = {"durable": True, "type": "classic", "arguments": {}}
    differences = mq.queue_differences(existing, mq.queue_arguments(single_active_consumer=False))
    assert differences == [("x-queue-type", "classic", "quorum")]
    assert mq.describe_differences("queue", "a", differences) == (
        "queue 'a' exists with x-queue-type='classic', asked 'quorum'")


def test_matching_queue_has_no_differences():
    desired = mq.queue_arguments(single_active_consumer=True, delivery_limit=3)
    assert mq.queue_differences({"durable": True, "type": "quorum", "arguments": dict(desired)}, desired) == []


def test_has_binding_ignores_bindings_with_arguments_or_other_keys():
    bindings = [{"routing_key": "alice", "arguments": {"x-match": "all"}}, {"routing_key": "bob", "arguments": {}}]
    assert not mq.has_binding(bindings, "alice")
    assert mq.has_binding(bindings, "bob")


def test_check_exchange_refuses_another_type():
    mq.check_exchange({"type": "topic", "durable": True}, "notification")
    with pytest.raises(PublisherError, match="^exchange 'notification' exists with type='direct', asked 'topic'"):
        mq.check_exchange({"type": "direct", "durable": True}, "notification")


# -- declare/delete flow against an in-memory management API ------------------------------------------------------

class FakeApi(object):
    """The ManagementApi methods the flow uses, over dicts; records every write."""

    def __init__(self, exchanges=None, queues=None, bindings=None):
        self.exchanges = exchanges if exchanges is not None else {"notification": {"type": "topic", "durable": True}}
        self.queues = queues or {}
        self.bindings = bindings or set()
        self.writes = []

    def get_exchange(self, name):
        return self.exchanges.get(name)

    def declare_exchange(self, name):
        self.writes.append(("exchange", name))
        self.exchanges[name] = {"type": "topic", "durable": True}

    def get_queue(self, name):
        return self.queues.get(name)

    def declare_queue(self, name, arguments):
        self.writes.append(("queue", name))
        self.queues[name] = {"durable": True, "type": "quorum", "arguments": arguments, "messages": 0}

    def delete_queue(self, name):
        self.writes.append(("delete", name))
        del self.queues[name]

    def get_bindings(self, exchange, queue):
        return [{"routing_key": key, "arguments": {}} for e, q, key in self.bindings if (e, q) == (exchange, queue)]

    def bind(self, exchange, queue, routing_key):
        self.writes.append(("bind", exchange, queue, routing_key))
        self.bindings.add((exchange, queue, routing_key))


def test_present_declares_everything_then_is_idempotent():
    api = FakeApi(exchanges={})
    params = queue_params(dead_letter_exchange="dlx", dead_letter_queue="dead", delivery_limit=5)
    result = mq.ensure_queue_present(api, params, check_mode=False)
    assert result["changed"] and result["messages"] == 0 and result["routing_key"] == "alice"
    assert api.writes == [("exchange", "notification"), ("exchange", "dlx"), ("queue", "dead"),
                          ("bind", "dlx", "dead", "dead"), ("queue", "alice"),
                          ("bind", "notification", "alice", "alice")]
    assert result["diff"]["before"] is None
    api.writes = []
    again = mq.ensure_queue_present(api, params, check_mode=False)
    assert again["changed"] is False and api.writes == []
    assert again["diff"]["before"] == again["diff"]["after"]


def test_check_mode_predicts_and_writes_nothing():
    api = FakeApi()
    result = mq.ensure_queue_present(api, queue_params(routing_key="alice.events"), check_mode=True)
    assert result["changed"] and api.writes == [] and "messages" not in result
    assert result["actions"] == ["declare durable quorum queue 'alice'",
                                 "bind queue 'alice' to exchange 'notification' with routing key 'alice.events'"]


def test_missing_binding_of_an_existing_queue_is_added():
    api = FakeApi(queues={"alice": {"durable": True, "type": "quorum", "messages": 3,
                                    "arguments": mq.queue_arguments(single_active_consumer=True)}})
    result = mq.ensure_queue_present(api, queue_params(), check_mode=False)
    assert result["changed"] and api.writes == [("bind", "notification", "alice", "alice")]
    assert result["messages"] == 3 and result["diff"]["before"]["binding"] is None


def test_conflicting_queue_fails_before_any_write():
    api = FakeApi(exchanges={}, queues={"alice": {"durable": True, "type": "quorum",
                                                  "arguments": {"x-queue-type": "quorum"}}})
    with pytest.raises(PublisherError) as caught:
        mq.ensure_queue_present(api, queue_params(), check_mode=False)
    assert caught.value.msg.startswith("queue 'alice' exists with x-single-active-consumer=false, asked true")
    assert api.writes == []


def test_dead_letter_queue_of_another_type_fails():
    api = FakeApi(exchanges={"notification": {"type": "topic", "durable": True}, "dlx": {"type": "topic",
                                                                                         "durable": True}},
                  queues={"dead": {"durable": True, "type": "classic", "arguments": {"x-max-length": 10}}})
    with pytest.raises(PublisherError, match="^dead-letter queue 'dead' exists with x-queue-type='classic', "
                                             "asked 'quorum'$"):
        mq.ensure_queue_present(api, queue_params(dead_letter_exchange="dlx", dead_letter_queue="dead"), False)


def test_absent_refuses_a_queue_with_messages_unless_forced():
    def api():
        return FakeApi(queues={"alice": {"durable": True, "type": "quorum", "messages": 4, "arguments": {}}},
                       bindings={("notification", "alice", "alice")})
    with pytest.raises(PublisherError, match="^queue 'alice' holds 4 messages: not deleting it"):
        mq.ensure_queue_absent(api(), queue_params(state="absent"), check_mode=False)
    checked = api()
    assert mq.ensure_queue_absent(checked, queue_params(state="absent", force=True), check_mode=True)["changed"]
    assert checked.writes == []
    forced = api()
    result = mq.ensure_queue_absent(forced, queue_params(state="absent", force=True), check_mode=False)
    assert forced.writes == [("delete", "alice")] and result["diff"]["after"] is None
    assert result["diff"]["before"]["binding"] == {"exchange": "notification", "routing_key": "alice"}


def test_absent_queue_is_unchanged():
    result = mq.ensure_queue_absent(FakeApi(), queue_params(state="absent"), check_mode=False)
    assert result["changed"] is False


# -- HTTP errors ----------------------------------------------------------------------------------------------------

def http_error(code, body=b'{"error":"x","reason":"some reason"}'):
    return HTTPError(API + "/api/x", code, "status", {}, io.BytesIO(body))


@pytest.mark.parametrize("raised, expected", [
    (http_error(401), "RabbitMQ refused login as 'guest' at http://127.0.0.1:15672: check login_user and "
                      "login_password (HTTP 401)"),
    (http_error(403), "RabbitMQ user 'guest' lacks the 'management' user tag (or any permission on the vhost) on "
                      "vhost '/' (GET /api/queues/%2F/alice refused, HTTP 403: some reason)"),
    (http_error(401, b'{"error":"not_authorised","reason":"Not management user"}'),
     "RabbitMQ user 'guest' lacks the 'management' user tag (or any permission on the vhost) on vhost '/' "
     "(GET /api/queues/%2F/alice refused, HTTP 401: Not management user)"),
    (http_error(500), "RabbitMQ management API GET /api/queues/%2F/alice failed: HTTP 500: some reason"),
    (URLError(ConnectionRefusedError(111, "Connection refused")),
     "RabbitMQ management API unreachable at http://127.0.0.1:15672: [Errno 111] Connection refused"),
    (socket.timeout("timed out"), "RabbitMQ management API unreachable at http://127.0.0.1:15672: timed out"),
])
def test_http_failures_become_operator_messages(monkeypatch, raised, expected):
    def fake_open_url(*args, **kwargs):
        raise raised
    monkeypatch.setattr(mq, "open_url", fake_open_url)
    with pytest.raises(PublisherError) as caught:
        mq.ManagementApi(queue_params()).get_queue("alice")
    assert caught.value.msg.startswith(expected)


@pytest.mark.parametrize("call, expected", [
    (lambda api: api.declare_queue("alice", {"x-queue-type": "quorum"}),
     "RabbitMQ user 'guest' lacks the 'configure' permission on queue 'alice' on vhost '/' (PUT /api/queues/%2F/alice "
     "refused, HTTP 401: Access refused.)"),
    (lambda api: api.declare_queue("alice", {"x-dead-letter-exchange": "dlx"}),
     "RabbitMQ user 'guest' lacks the 'configure' permission on queue 'alice' and, for a dead-letter exchange, the "
     "'read' permission on that queue and 'write' on the dead-letter exchange on vhost '/'"),
    (lambda api: api.delete_queue("alice"),
     "RabbitMQ user 'guest' lacks the 'configure' permission on queue 'alice' on vhost '/'"),
    (lambda api: api.declare_exchange("notification"),
     "RabbitMQ user 'guest' lacks the 'configure' permission on exchange 'notification' on vhost '/'"),
    (lambda api: api.bind("notification", "alice", "alice"),
     "RabbitMQ user 'guest' lacks the 'write' permission on queue 'alice' and the 'read' permission on exchange "
     "'notification' (needed to bind them) on vhost '/'"),
])
def test_a_refused_permission_names_the_user_and_the_right(monkeypatch, call, expected):
    """The management API says 401 "Access refused." for a missing permission: not a login failure."""
    def fake_open_url(*args, **kwargs):
        raise http_error(401, b'{"error":"not_authorised","reason":"Access refused."}')
    monkeypatch.setattr(mq, "open_url", fake_open_url)
    with pytest.raises(PublisherError) as caught:
        call(mq.ManagementApi(queue_params()))
    assert caught.value.msg.startswith(expected), caught.value.msg


def test_missing_queue_is_none_and_the_password_comes_from_its_file(monkeypatch, tmp_path):
    seen = {}

    def fake_open_url(url, context, **kwargs):
        seen.update(kwargs, url=url, context=context)
        raise http_error(404)
    monkeypatch.setattr(mq, "open_url", fake_open_url)
    secret = tmp_path / "password"
    secret.write_text("from-file\n")
    api = mq.ManagementApi(queue_params(login_password=None, login_password_file=str(secret), vhost="/prod"))
    assert api.get_queue("alice") is None
    assert seen["url"] == API + "/api/queues/%2Fprod/alice"
    assert seen["url_password"] == "from-file" and seen["force_basic_auth"]


# -- module argument handling ------------------------------------------------------------------------------------

def run_main(args, capsys):
    with patch_module_args(args):
        with pytest.raises(SystemExit):
            amqp_queue.main()
    return json.loads(capsys.readouterr().out)


def test_dead_letter_queue_needs_dead_letter_exchange(capsys):
    result = run_main(dict(api_url=API, name="alice", dead_letter_queue="dead"), capsys)
    assert result["failed"] and "dead_letter_exchange" in result["msg"]


def test_strategy_choices_are_checked(capsys):
    result = run_main(dict(api_url=API, name="alice", dead_letter_exchange="dlx", dead_letter_strategy="maybe"),
                      capsys)
    assert result["failed"] and "dead_letter_strategy" in result["msg"] and "at-least-once" in result["msg"]


def test_password_never_in_the_result(capsys):
    # Port 9 on loopback: nothing listens, so the module fails with a connection error after parsing its options.
    result = run_main(dict(api_url="http://127.0.0.1:9", name="alice", login_password="Sup3r-s3cret", timeout=2),
                      capsys)
    assert result["failed"] and result["msg"].startswith("RabbitMQ management API unreachable at http://127.0.0.1:9")
    assert "Sup3r-s3cret" not in json.dumps(result)


def test_one_tls_context_per_client_and_none_loaded_for_http(monkeypatch):
    """ansible's open_url builds a TLS context (CA bundle and system folders read) on every call: the client makes
    one for all its calls over https, and none that loads anything over http."""
    made = []
    monkeypatch.setattr(mq, "make_context", lambda **kwargs: made.append(kwargs) or object())
    api = mq.ManagementApi(dict(queue_params(), api_url="https://rabbit.example:15671", ca_cert="/etc/ca.pem"))
    assert api.tls_context is api.tls_context
    assert made == [{"cafile": "/etc/ca.pem", "validate_certs": True}]
    del made[:]
    plain = mq.ManagementApi(queue_params())
    assert plain.tls_context is plain.tls_context and made == []
