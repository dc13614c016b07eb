# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""The base class of every module in this collection.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.

Modules stay thin: they declare options, call into one module_utils file per external system, and report.
Errors from those files are ``PublisherError`` subclasses whose message is already fit for an operator;
``PublisherModule.run`` turns them into ``fail_json`` so no module repeats that dance.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import random
import re
import time
import traceback

from ansible.module_utils.basic import AnsibleModule
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


class PublisherModule(AnsibleModule):
    """AnsibleModule with the collection's shared option sets merged in and one error path."""

    def __init__(self, argument_spec, option_sets=(), **kwargs):
        spec = {}
        for option_set in option_sets:
            spec.update(option_set)
        spec.update(argument_spec)
        kwargs.setdefault("supports_check_mode", True)
        super(PublisherModule, self).__init__(argument_spec=spec, **kwargs)

    def run(self, func):
        """Call ``func(self)`` and exit with its result dict; a PublisherError becomes a clear failure.

        A ``diff`` in the result is reported only when the operator asked for one (``--diff``).
        """
        failure = None
        try:
            result = func(self)
        except PublisherError as exc:
            failure = dict(msg=exc.msg, **exc.details)
        except InvalidName as exc:
            failure = dict(msg=str(exc))
        except Exception as exc:  # a bug, not an operator error: keep the traceback for -vvv
            failure = dict(msg="unexpected error: %s: %s" % (type(exc).__name__, exc),
                           exception=traceback.format_exc())
        # fail_json outside the except block: inside it, ansible-core 2.19 attaches a placeholder traceback.
        if failure is not None:
            self.fail_json(**failure)
        if not self._diff:
            result.pop("diff", None)
        self.exit_json(**result)
