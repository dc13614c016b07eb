# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""RabbitMQ through its management HTTP API (as community.rabbitmq does): exchanges, queues, bindings.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.

Pure logic first (desired queue arguments, comparison with an existing queue, messages), then ``ManagementApi``
(the only I/O, through ``ansible.module_utils.urls.Request``), which raises ``PublisherError`` with
operator-ready messages. The management API and not AMQP: it reports a queue's arguments and message count
without declaring anything, which is what check mode and the "exists with other arguments" check need.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import socket
import ssl

from urllib.error import HTTPError, URLError
from urllib.parse import quote, unquote

from ansible.module_utils.urls import Request, make_context

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._module import (
    PublisherError,
    secret_option,
    tls_failure,
)

# ---------------------------------------------------------------------------------------------------------------
# Options (documented once in plugins/doc_fragments/rabbitmq.py)

RABBITMQ_ARGUMENT_SPEC = dict(
    api_url=dict(type="str", required=True),
    login_user=dict(type="str", default="guest"),
    login_password=dict(type="str", no_log=True),
    login_password_file=dict(type="path", no_log=False),
    vhost=dict(type="str", default="/"),
    ca_cert=dict(type="path"),
    validate_certs=dict(type="bool", default=True),
    timeout=dict(type="int", default=30),
)
RABBITMQ_MUTUALLY_EXCLUSIVE = [["login_password", "login_password_file"]]

QUEUE_TYPE = "quorum"
EXCHANGE_TYPE = "topic"

# Arguments RabbitMQ treats as a given value when they are absent, so absent and default compare equal.
IMPLICIT_ARGUMENTS = {"x-single-active-consumer": False}

# ---------------------------------------------------------------------------------------------------------------
# Pure logic


def queue_arguments(single_active_consumer=False, dead_letter_exchange=None, dead_letter_queue=None,
                    dead_letter_strategy=None, delivery_limit=None):
    """The ``x-*`` arguments of a durable quorum queue with the options asked."""
    arguments = {"x-queue-type": QUEUE_TYPE}
    if single_active_consumer:
        arguments["x-single-active-consumer"] = True
    if dead_letter_exchange:
        arguments["x-dead-letter-exchange"] = dead_letter_exchange
    if dead_letter_queue:
        # Dead letters are routed to the DLQ through the DLX by this key (the DLQ is bound with it).
        arguments["x-dead-letter-routing-key"] = dead_letter_queue
    if dead_letter_strategy:
        arguments["x-dead-letter-strategy"] = dead_letter_strategy
        if dead_letter_strategy == "at-least-once":
            # Quorum queues refuse at-least-once dead-lettering unless overflow rejects publishes.
            arguments["x-overflow"] = "reject-publish"
    if delivery_limit is not None:
        arguments["x-delivery-limit"] = delivery_limit
    return arguments


def queue_arguments_from_params(params):
    return queue_arguments(
        single_active_consumer=params.get("single_active_consumer"),
        dead_letter_exchange=params.get("dead_letter_exchange"),
        dead_letter_queue=params.get("dead_letter_queue"),
        dead_letter_strategy=params.get("dead_letter_strategy"),
        delivery_limit=params.get("delivery_limit"),
    )


def effective_arguments(queue):
    """An existing queue's arguments as declared, with its type filled in (classic queues may carry none)."""
    arguments = dict(queue.get("arguments") or {})
    arguments.setdefault("x-queue-type", queue.get("type") or "classic")
    return arguments


def _shown(value):
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return "'%s'" % (value,)


def queue_differences(queue, desired_arguments, durable=True, only=None):
    """What differs between an existing queue (management API JSON) and the one asked, as
    ``[(what, existing, asked)]`` sorted by name; ``only`` limits the arguments compared."""
    existing = effective_arguments(queue)
    differences = []
    if bool(queue.get("durable")) != durable:
        differences.append(("durable", bool(queue.get("durable")), durable))
    if queue.get("auto_delete"):
        differences.append(("auto_delete", True, False))
    if queue.get("exclusive"):
        differences.append(("exclusive", True, False))
    names = sorted(set(existing) | set(desired_arguments))
    if only is not None:
        names = [name for name in names if name in only]
    for name in names:
        have = existing.get(name, IMPLICIT_ARGUMENTS.get(name))
        want = desired_arguments.get(name, IMPLICIT_ARGUMENTS.get(name))
        if have != want:
            differences.append((name, have, want))
    return differences


def describe_differences(kind, name, differences):
    """``queue 'alice' exists with x-single-active-consumer=false, asked true; durable=false, asked true``."""
    parts = ["%s=%s, asked %s" % (what, _shown(have), _shown(want)) for what, have, want in differences]
    return "%s '%s' exists with %s" % (kind, name, "; ".join(parts))


def has_binding(bindings, routing_key):
    return any(binding.get("routing_key") == routing_key and not binding.get("arguments") for binding in bindings)


def queue_state(name, arguments, durable, exchange, routing_key, bound):
    """What the diff shows of a queue: its arguments and whether its binding is there."""
    return dict(queue=name, durable=durable, arguments=arguments,
                binding=dict(exchange=exchange, routing_key=routing_key) if bound else None)


# ---------------------------------------------------------------------------------------------------------------
# Management API client


def open_url(url, context, **kwargs):
    """ansible's ``open_url`` given a TLS context: ansible's own builds a new one for each call, reading the CA
    bundle and the system's certificate folders each time (about 20 ms a call, also for http://)."""
    return Request(context=context).open(kwargs.pop("method"), url, **kwargs)


class ManagementApi(object):
    """The few management API calls the modules need; every failure becomes a PublisherError."""

    def __init__(self, params):
        self.base_url = params["api_url"].rstrip("/")
        self.user = params.get("login_user") or "guest"
        self.password = secret_option(params, "login_password", "RabbitMQ password")
        self.vhost = params.get("vhost") or "/"
        self.ca_cert = params.get("ca_cert")
        self.validate_certs = params.get("validate_certs", True)
        self.timeout = params.get("timeout") or 30
        self._dlx_asked = False
        self._context = None

    @property
    def tls_context(self):
        """One TLS context for every call of this client; for an http:// api_url a bare one nobody uses."""
        if self._context is None:
            if self.base_url.lower().startswith("https://"):
                self._context = make_context(cafile=self.ca_cert, validate_certs=self.validate_certs)
            else:
                self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        return self._context

    def _path(self, collection, *names):
        return "/api/%s/%s/%s" % (collection, quote(self.vhost, safe=""),
                                  "/".join(quote(name, safe="") for name in names))

    def request(self, method, path, body=None, allow_missing=False):
        """JSON answer of one call; None when ``allow_missing`` and the answer is 404."""
        url = self.base_url + path
        data = json.dumps(body).encode("utf-8") if body is not None else None
        try:
            response = open_url(
                url, self.tls_context, data=data, method=method, headers={"Content-Type": "application/json"},
                url_username=self.user, url_password=self.password or "", force_basic_auth=True,
                validate_certs=self.validate_certs, timeout=self.timeout,
                follow_redirects="none",
            )
            content = response.read()
        except HTTPError as exc:
            if exc.code == 404 and allow_missing:
                return None
            raise PublisherError(self._http_error_message(method, path, exc))
        except (URLError, socket.error, socket.timeout) as exc:
            reason = getattr(exc, "reason", exc)
            refused = tls_failure(reason, "RabbitMQ management API", self.base_url, "ca_cert")
            if refused:
                raise PublisherError(refused)
            raise PublisherError("RabbitMQ management API unreachable at %s: %s (check api_url and that the "
                                 "rabbitmq_management plugin is enabled)" % (self.base_url, reason))
        if not content:
            return {}
        try:
            return json.loads(content)
        except ValueError:
            raise PublisherError("RabbitMQ management API at %s answered %s %s with something that is not JSON"
                                 % (self.base_url, method, path))

    def _http_error_message(self, method, path, exc):
        try:
            reason = json.loads(exc.read() or b"{}").get("reason") or exc.reason
        except (ValueError, AttributeError):
            reason = exc.reason
        # The management API answers 401 both for a failed login and for a missing permission ("Access refused.")
        # or user tag ("Not management user").
        if exc.code == 401 and reason not in ("Access refused.", "Not management user"):
            return ("RabbitMQ refused login as '%s' at %s: check login_user and login_password (HTTP 401)"
                    % (self.user, self.base_url))
        if exc.code in (401, 403):
            return ("RabbitMQ user '%s' lacks %s on vhost '%s' (%s %s refused, HTTP %d: %s)"
                    % (self.user, needed_right(method, path, body_has_dlx=self._dlx_asked), self.vhost, method,
                       path, exc.code, reason))
        return "RabbitMQ management API %s %s failed: HTTP %s: %s" % (method, path, exc.code, reason)

    # exchanges ----------------------------------------------------------------------------------------------

    def get_exchange(self, name):
        return self.request("GET", self._path("exchanges", name), allow_missing=True)

    def declare_exchange(self, name, exchange_type=EXCHANGE_TYPE):
        self.request("PUT", self._path("exchanges", name),
                     {"type": exchange_type, "durable": True, "auto_delete": False, "internal": False,
                      "arguments": {}})

    # queues -------------------------------------------------------------------------------------------------

    def get_queue(self, name):
        return self.request("GET", self._path("queues", name), allow_missing=True)

    def declare_queue(self, name, arguments):
        self._dlx_asked = "x-dead-letter-exchange" in arguments
        self.request("PUT", self._path("queues", name),
                     {"durable": True, "auto_delete": False, "arguments": arguments})

    def delete_queue(self, name):
        self.request("DELETE", self._path("queues", name))

    # bindings -----------------------------------------------------------------------------------------------

    def get_bindings(self, exchange, queue):
        path = "/api/bindings/%s/e/%s/q/%s" % (quote(self.vhost, safe=""), quote(exchange, safe=""),
                                               quote(queue, safe=""))
        return self.request("GET", path, allow_missing=True) or []

    def bind(self, exchange, queue, routing_key):
        path = "/api/bindings/%s/e/%s/q/%s" % (quote(self.vhost, safe=""), quote(exchange, safe=""),
                                               quote(queue, safe=""))
        self.request("POST", path, {"routing_key": routing_key, "arguments": {}})


def needed_right(method, path, body_has_dlx=False):
    """The RabbitMQ permission a refused management API call needed, in RabbitMQ's words (configure / write /
    read regular expressions of the user on the vhost, plus the management tag for any API call)."""
    parts = [unquote(part) for part in path.split("/")]
    # /api/<collection>/<vhost>/<name...>
    collection = parts[2] if len(parts) > 2 else ""
    if collection == "bindings" and len(parts) >= 8:
        return ("the 'write' permission on queue '%s' and the 'read' permission on exchange '%s' (needed to bind "
                "them)" % (parts[7], parts[5]))
    if collection in ("queues", "exchanges") and len(parts) >= 5 and method in ("PUT", "DELETE"):
        kind = collection[:-1]
        right = "the 'configure' permission on %s '%s'" % (kind, parts[4])
        if body_has_dlx and kind == "queue" and method == "PUT":
            right += (" and, for a dead-letter exchange, the 'read' permission on that queue and 'write' on the "
                      "dead-letter exchange")
        return right
    return "the 'management' user tag (or any permission on the vhost)"


def check_exchange(exchange, name, exchange_type=EXCHANGE_TYPE):
    """Fail when an existing exchange is not a durable exchange of the type asked (it is never redeclared)."""
    differences = []
    if exchange.get("type") != exchange_type:
        differences.append(("type", exchange.get("type"), exchange_type))
    if not exchange.get("durable"):
        differences.append(("durable", False, True))
    if differences:
        raise PublisherError(describe_differences("exchange", name, differences))


# ---------------------------------------------------------------------------------------------------------------
# What amqp_queue does: check everything first, then change what is missing (nothing is ever deleted implicitly)


def _ensure_exchange(api, name, actions):
    existing = api.get_exchange(name)
    if existing is None:
        actions.append(("exchange", name))
    else:
        check_exchange(existing, name)


def _ensure_binding(api, exchange, queue, routing_key, queue_exists, actions):
    bound = queue_exists and has_binding(api.get_bindings(exchange, queue), routing_key)
    if not bound:
        actions.append(("binding", (exchange, queue, routing_key)))
    return bound


def ensure_queue_present(api, params, check_mode):
    """Declare the exchange(s), the dead-letter queue and the quorum queue and bind them; returns the result dict.

    An existing queue, DLQ or exchange that differs from what is asked fails with every difference named:
    RabbitMQ cannot change a queue's arguments, and deleting it would lose messages.
    """
    name, exchange = params["name"], params["exchange"]
    routing_key = params.get("routing_key") or name
    dlx, dlq = params.get("dead_letter_exchange"), params.get("dead_letter_queue")
    arguments = queue_arguments_from_params(params)
    actions = []

    _ensure_exchange(api, exchange, actions)
    if dlx and dlx != exchange:
        _ensure_exchange(api, dlx, actions)
    if dlq:
        existing_dlq = api.get_queue(dlq)
        if existing_dlq is None:
            actions.append(("queue", (dlq, {"x-queue-type": QUEUE_TYPE})))
        else:
            # The DLQ may be shared and tuned elsewhere: only its durability and type matter here.
            differences = queue_differences(existing_dlq, {"x-queue-type": QUEUE_TYPE}, only=("x-queue-type",))
            if differences:
                raise PublisherError(describe_differences("dead-letter queue", dlq, differences))
        _ensure_binding(api, dlx, dlq, dlq, existing_dlq is not None, actions)

    existing = api.get_queue(name)
    if existing is not None:
        differences = queue_differences(existing, arguments)
        if differences:
            raise PublisherError(
                describe_differences("queue", name, differences)
                + " (RabbitMQ cannot change a queue's arguments; delete it with state=absent once it is drained, "
                  "or ask for what it has)", queue=name)
    else:
        actions.append(("queue", (name, arguments)))
    bound = _ensure_binding(api, exchange, name, routing_key, existing is not None, actions)
    before = None if existing is None else queue_state(
        name, effective_arguments(existing), bool(existing.get("durable")), exchange, routing_key, bound)

    if not check_mode:
        for kind, what in actions:
            if kind == "exchange":
                api.declare_exchange(what)
            elif kind == "queue":
                api.declare_queue(*what)
            else:
                api.bind(*what)

    result = dict(
        changed=bool(actions), queue=name, exchange=exchange, routing_key=routing_key, arguments=arguments,
        durable=True, dead_letter_exchange=dlx, dead_letter_queue=dlq, actions=[_describe_action(a) for a in actions],
        diff=dict(before=before, after=queue_state(name, arguments, True, exchange, routing_key, True)),
    )
    if existing is not None:
        result["messages"] = existing.get("messages", 0)
    elif not check_mode:
        result["messages"] = 0
    return result


def _describe_action(action):
    kind, what = action
    if kind == "exchange":
        return "declare durable %s exchange '%s'" % (EXCHANGE_TYPE, what)
    if kind == "queue":
        return "declare durable %s queue '%s'" % (QUEUE_TYPE, what[0])
    return "bind queue '%s' to exchange '%s' with routing key '%s'" % (what[1], what[0], what[2])


def ensure_queue_absent(api, params, check_mode):
    """Delete the queue (its bindings go with it) only when it is empty, or when ``force`` says so."""
    name, exchange = params["name"], params["exchange"]
    routing_key = params.get("routing_key") or name
    existing = api.get_queue(name)
    if existing is None:
        return dict(changed=False, queue=name, diff=dict(before=None, after=None))
    # The count comes from the management statistics, refreshed every few seconds by the broker.
    messages = existing.get("messages") or 0
    if messages and not params.get("force"):
        raise PublisherError("queue '%s' holds %d messages: not deleting it (drain it first, or set force: true "
                             "to delete it with its messages)" % (name, messages), queue=name, messages=messages)
    bound = has_binding(api.get_bindings(exchange, name), routing_key)
    before = queue_state(name, effective_arguments(existing), bool(existing.get("durable")), exchange, routing_key,
                         bound)
    if not check_mode:
        api.delete_queue(name)
    return dict(changed=True, queue=name, messages=messages, diff=dict(before=before, after=None))
