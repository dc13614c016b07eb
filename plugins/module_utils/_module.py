# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""The base class of every module in this collection.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.

Modules stay thin: they declare options, call into one module_utils file per external system, and report.
Errors from those files are ``PublisherError`` subclasses whose message is already fit for an operator;
``PublisherModule.run`` turns them into ``fail_json`` so no module repeats that dance.

The provisioning modules also take ``batch`` (``PublisherModule(..., batch=True)``): a list of option sets, each
run as if the module had been called once with it merged over the task's other options, in one module process
with one client per connection (``client``). A fleet of repositories then costs one module start-up per step
instead of one per repository (issue 12: 500 module runs for 100 repositories were 3 minutes of CPU on the
controller and in module start-ups).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import random
import re
import time
import traceback

from ansible.module_utils import basic
from ansible.module_utils.basic import AnsibleModule
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _batch
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._naming import InvalidName


class PublisherError(Exception):
    """An error whose message says what failed and what to check; ``details`` go into the result."""

    def __init__(self, msg, **details):
        super(PublisherError, self).__init__(msg)
        self.msg = msg
        self.details = details


# OpenSSL's verdict as Python's ssl reports it, and urllib3's own host name check (botocore).
_TLS_VERDICTS = (re.compile(r"certificate verify failed: (.*?)\s*(?:\(_ssl\.c:\d+\)|'\)|$)"),
                 re.compile(r"(hostname '[^']*' doesn't match '[^']*')"))


def with_backoff(call, retryable, retries=5, delay=1.0, max_delay=30.0, sleep=time.sleep):
    """``call()``, tried again after a full-jitter backoff while it raises an error ``retryable(exc)`` accepts, at
    most ``retries`` more times (the last error is raised). The one retry loop of the collection's clients."""
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as exc:  # classified by the caller's retryable()
            if attempt >= retries or not retryable(exc):
                raise
            sleep(random.uniform(0, min(max_delay, delay * (2 ** attempt))))


def tls_failure(exc, server, url, ca_option):
    """The operator message for a refused server certificate (wrong CA or wrong host name), or None when ``exc``
    is not a certificate verification failure: ``<server> at <url>: TLS certificate verification failed
    (<OpenSSL's verdict>); ...`` with what to set. OpenSSL's verdict is the one part of the exception text that
    matters (`unable to get local issuer certificate`, `Hostname mismatch, certificate is not valid for 'x'`)."""
    text = str(exc)
    match = next((found for found in (pattern.search(text) for pattern in _TLS_VERDICTS) if found), None)
    if not match:
        return None
    return ("%s at %s: TLS certificate verification failed (%s); set %s to the CA bundle that signs the server's "
            "certificate and use a host name the certificate covers" % (server, url, match.group(1).rstrip("."),
                                                                        ca_option))


def read_secret_file(path, what):
    """Read a secret from a file (trailing newline stripped); the message names the file, never the content."""
    try:
        with open(path, "r") as handle:
            value = handle.read().strip()
    except (IOError, OSError) as exc:
        raise PublisherError("cannot read %s from %s: %s" % (what, path, exc.strerror or exc))
    if not value:
        raise PublisherError("%s file %s is empty" % (what, path))
    return value


def secret_option(params, name, what):
    """The value of option ``name`` or, when unset, the content of ``<name>_file``; None when neither is set."""
    value = params.get(name)
    if value:
        return value
    path = params.get(name + "_file")
    if path:
        return read_secret_file(path, what)
    return None


BATCH_ARGUMENT_SPEC = dict(batch=dict(type="list", elements="dict"))


def _call(func, module):
    """(result, None) or (None, failure dict): ``func(module)`` with a PublisherError turned into its message."""
    try:
        return func(module), None
    except PublisherError as exc:
        return None, dict(msg=exc.msg, **exc.details)
    except InvalidName as exc:
        return None, dict(msg=str(exc))
    except Exception as exc:  # a bug, not an operator error: keep the traceback for -vvv
        return None, dict(msg="unexpected error: %s: %s" % (type(exc).__name__, exc),
                          exception=traceback.format_exc())


class PublisherModule(AnsibleModule):
    """AnsibleModule with the collection's shared option sets merged in, one error path, and ``batch``."""

    def __init__(self, argument_spec, option_sets=(), batch=False, label=None, secrets_of=None, **kwargs):
        """``batch``: take the ``batch`` option (_batch.py); ``label``: the option that names an object in a
        batch's messages (the module's first option by default); ``secrets_of(params)``: values to mask that no
        option's no_log covers (masked from the start: in the module's log line and every result)."""
        shared = {}
        for option_set in option_sets:
            shared.update(option_set)
        spec = dict(shared, **argument_spec)
        kwargs.setdefault("supports_check_mode", True)
        self._clients = {}
        self._shared_options = sorted(shared)
        constraints = dict((name, kwargs.pop(name)) for name in _batch.CONSTRAINTS if name in kwargs)
        # The options as the task gave them, read again only by the modules that need them (None: ansible-test's
        # argspec introspection).
        raw = dict(basic._load_params() or {}) if batch or secrets_of else {}
        self._batch = None
        if batch and raw.get("batch") is not None:
            self._batch = _batch.Batch(raw["batch"], _batch.task_options(raw), spec, constraints,
                                       label or next(iter(argument_spec)), secrets_of)
            self._early_secrets = self._batch.secrets
            # Only the task-level options are checked here (types, choices); each merged item gets every check.
            spec = _batch.relaxed(spec)
        else:
            self._early_secrets = _batch.found_secrets(secrets_of, raw)
            kwargs.update(constraints)
        if batch:
            spec.update(BATCH_ARGUMENT_SPEC)
        super(PublisherModule, self).__init__(argument_spec=spec, **kwargs)

    def _log_invocation(self):
        self.no_log_values.update(self._early_secrets)
        super(PublisherModule, self)._log_invocation()

    def _return_formatted(self, kwargs):
        """Every result leaves through here (exit_json and fail_json, also from ``__init__``'s checks)."""
        self.no_log_values.update(self._early_secrets)
        return super(PublisherModule, self)._return_formatted(kwargs)

    def client(self, factory):
        """``factory(self.params)``, made once per module process for the same connection options (the option
        sets): the items of a batch share their client, its login and its TLS context."""
        key = (factory,) + tuple(repr(self.params.get(name)) for name in self._shared_options)
        if key not in self._clients:
            try:
                self._clients[key] = factory(self.params)
            except PublisherError as exc:  # e.g. a refused login: the next items fail with it, not after retries
                self._clients[key] = exc
        client = self._clients[key]
        if isinstance(client, PublisherError):
            raise client
        return client

    def run(self, func):
        """Call ``func(self)`` and exit with its result dict; a PublisherError becomes a clear failure.

        A ``diff`` in the result is reported only when the operator asked for one (``--diff``). With ``batch``,
        ``func`` runs once per item with ``self.params`` set to that item's options (see ``run_batch``).
        """
        if self._batch is not None:
            return self.run_batch(func)
        result, failure = _call(func, self)
        self.close_clients()
        # fail_json outside the except block: inside it, ansible-core 2.19 attaches a placeholder traceback.
        if failure is not None:
            self.fail_json(**failure)
        if not self._diff:
            result.pop("diff", None)
        self.exit_json(**result)

    def close_clients(self):
        """Log out every client that logs in (``logout``), once, after the last item; best effort."""
        for client in self._clients.values():
            if isinstance(client, PublisherError):
                continue
            try:
                getattr(client, "logout", lambda: None)()
            except Exception:  # pylint: disable=broad-exception-caught  # a lease left to expire, not a failure
                pass
        self._clients.clear()

    def run_batch(self, func):
        """Each item of ``batch`` (_batch.py: merged over the task's other options, checked against the whole
        argument spec), then ``func(self)`` on it; one item's failure does not stop the others. The result has
        ``results`` (one per item, in order, each with ``item``, ``changed`` and, when it failed, ``failed`` and
        ``msg``), ``diff`` (the items' diffs, with ``--diff``), and fails naming every failed item (``<n> of <m>
        failed: <label>: <message>; ...``)."""
        results, diffs, failures = [], [], []
        task_params = self.params
        for item in self._batch.items:
            if item.errors:
                result, failure = None, dict(msg=item.errors)
            else:
                self.params = item.params
                try:
                    result, failure = _call(func, self)
                finally:
                    self.params = task_params
            result = dict(failure, failed=True, changed=False) if failure else result
            diff = result.pop("diff", None)
            if diff and self._diff:  # headed by the object it is about: "--- before: alice"
                header = dict(before_header=str(item.label), after_header=str(item.label)) if item.label else {}
                diffs.append(dict(header, **diff))
            results.append(dict(result, item=item.given))
            if failure:
                failures.append("%s: %s" % (item.label or "item %d" % len(results), failure["msg"]))
        self.close_clients()
        summary = dict(changed=any(result["changed"] for result in results), results=results)
        if diffs:
            summary["diff"] = diffs
        if failures:
            counted = "%d of %d failed: " % (len(failures), len(results)) if len(results) > 1 else ""
            self.fail_json(msg=counted + "; ".join(failures), **summary)
        self.exit_json(**summary)
