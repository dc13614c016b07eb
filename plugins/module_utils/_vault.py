# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""Vault (or OpenBao) access: AppRole login and reading a repository's keys from KV v2.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.

Key material leaves this file only as the values of the returned dict. Messages name URLs, mounts, paths and
field names, never values; server replies are quoted only after the credentials are scrubbed from them.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import re

from ansible.module_utils.basic import env_fallback
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._naming import vault_keys_path
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._module import (
    PublisherError,
    secret_option,
    tls_failure,
    with_backoff,
)

try:
    import hvac
    import hvac.exceptions
    import requests.exceptions
except ImportError:  # reported by the module through missing_required_lib
    hvac = None

HAS_HVAC = hvac is not None

# Options shared by every module that talks to Vault (documented in doc_fragments/vault.py).
VAULT_ARGSPEC = dict(
    url=dict(type="str", fallback=(env_fallback, ["VAULT_ADDR"])),
    ca_cert=dict(type="path", fallback=(env_fallback, ["VAULT_CACERT"])),
    validate_certs=dict(type="bool", default=True),
    timeout=dict(type="int", default=30),
    role_id=dict(type="str"),
    role_id_file=dict(type="path"),
    secret_id=dict(type="str", no_log=True),
    secret_id_file=dict(type="path", no_log=False),
    approle_mount_point=dict(type="str", default="approle"),
    kv_mount=dict(type="str", default="secrets"),
)
VAULT_MUTUALLY_EXCLUSIVE = [["role_id", "role_id_file"], ["secret_id", "secret_id_file"]]


class VaultError(PublisherError):
    """Vault could not be reached, refused the login, or does not hold what was asked for."""


def _short_reason(exc):
    """`[Errno 111] Connection refused` out of requests' long ConnectionError text."""
    text = str(exc)
    match = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    if match:
        return match.group(0).strip()
    if "timed out" in text.lower():
        return "timed out"
    return text


# A Vault answer worth another try within the run: 5xx and 429. OpenBao answers 500 "transaction commit failed"
# when several AppRole logins update the same secret_id's use count at once (8 forks converging 100 repositories).
# Short: the daemon retries the whole run with its own backoff; this only spares a run for a momentary refusal.
BUSY_RETRIES = 4
BUSY_DELAY = 0.5
BUSY_MAX_DELAY = 4.0


def _busy(exc):
    return HAS_HVAC and isinstance(exc, (hvac.exceptions.InternalServerError, hvac.exceptions.BadGateway,
                                         hvac.exceptions.VaultDown, hvac.exceptions.RateLimitExceeded))


def _patiently(call):
    """``call()``, retried with jittered backoff while Vault answers busy (``_busy``)."""
    return with_backoff(call, _busy, BUSY_RETRIES, BUSY_DELAY, BUSY_MAX_DELAY)


class VaultClient:
    """A logged-in client for one Vault server. Build it with ``VaultClient.login(params)``."""

    def __init__(self, client, url, identity="the AppRole"):
        self.client = client
        self.url = url
        self.identity = identity    # who Vault saw log in, for refusals ("the AppRole 'cvmfs-publisher'")

    @classmethod
    def login(cls, params):
        """AppRole login with the connection options of VAULT_ARGSPEC; raises VaultError with a clear message."""
        if not HAS_HVAC:
            raise VaultError("the hvac Python library is required on the host running this module")
        url = params.get("url")
        if not url:
            raise VaultError("no Vault URL: set the url option or the VAULT_ADDR environment variable")
        role_id = secret_option(params, "role_id", "the AppRole role_id")
        if not role_id:
            raise VaultError("one of role_id or role_id_file is required for the AppRole login")
        secret_id = secret_option(params, "secret_id", "the AppRole secret_id")
        verify = (params.get("ca_cert") or True) if params.get("validate_certs", True) else False
        client = hvac.Client(url=url, verify=verify, timeout=params.get("timeout") or 30)
        mount = params.get("approle_mount_point") or "approle"
        what = "AppRole login at %s (auth mount %r)" % (url, mount)
        try:
            reply = _patiently(lambda: client.auth.approle.login(role_id=role_id, secret_id=secret_id,
                                                                 mount_point=mount))
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.Unauthorized, hvac.exceptions.Forbidden) as exc:
            raise VaultError("%s failed: invalid role_id or secret_id (server said: %s)"
                             % (what, _server_message(exc, role_id, secret_id)))
        except hvac.exceptions.InvalidPath:
            raise VaultError("%s failed: no AppRole auth method is mounted at %r" % (what, mount))
        except Exception as exc:
            raise _transport_error(exc, url, what)
        role_name = (((reply or {}).get("auth") or {}).get("metadata") or {}).get("role_name")
        return cls(client, url, "the AppRole %r" % role_name if role_name else "the AppRole")

    def read_kv2(self, mount, path):
        """The data of the latest version of a KV v2 secret; None when there is none (or it was deleted)."""
        where = "%s/%s" % (mount, path)
        try:
            reply = _patiently(lambda: self.client.secrets.kv.v2.read_secret_version(
                path=path, mount_point=mount, raise_on_deleted_version=True))
        except hvac.exceptions.InvalidPath:
            return None
        except hvac.exceptions.Forbidden:
            raise VaultError("permission denied reading %s from Vault at %s: %s has no policy "
                             "allowing 'read' on %s/data/%s" % (where, self.url, self.identity, mount, path))
        except Exception as exc:
            raise _transport_error(exc, self.url, "reading %s" % where)
        data = (reply or {}).get("data") or {}
        return data.get("data")

    def logout(self):
        """Revoke the login token (best effort: it expires anyway)."""
        try:
            self.client.auth.token.revoke_self()
        except Exception:
            pass


def _server_message(exc, *secrets):
    """The server's own error text (hvac's ``errors``), with any credential scrubbed out."""
    text = ", ".join(getattr(exc, "errors", None) or []) or type(exc).__name__
    for secret in secrets:
        if secret:
            text = text.replace(secret, "********")
    return text


def _transport_error(exc, url, what):
    """A VaultError for network, TLS and unexpected server errors."""
    if HAS_HVAC and isinstance(exc, requests.exceptions.SSLError):
        refused = tls_failure(exc, "Vault", url, "ca_cert (or VAULT_CACERT)")
        return VaultError("%s: %s" % (what, refused) if refused else "%s: TLS error talking to Vault at %s (%s)"
                          % (what, url, _short_reason(exc)))
    if HAS_HVAC and isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return VaultError("%s: cannot reach Vault at %s (%s)" % (what, url, _short_reason(exc)))
    if HAS_HVAC and isinstance(exc, hvac.exceptions.VaultDown):
        return VaultError("%s: Vault at %s is sealed or in maintenance" % (what, url))
    if HAS_HVAC and isinstance(exc, hvac.exceptions.VaultError):
        return VaultError("%s: Vault at %s answered %s: %s" % (what, url, type(exc).__name__, _server_message(exc)))
    if HAS_HVAC and isinstance(exc, requests.exceptions.RequestException):
        return VaultError("%s: request to Vault at %s failed (%s)" % (what, url, _short_reason(exc)))
    raise exc


def repository_key_material(client, mount, path, fqrn, fields):
    """{field: str} for the given Vault fields of a repository's keys; clear errors for missing keys or fields."""
    data = client.read_kv2(mount, path)
    if data is None:
        raise VaultError("no keys for %s at %s/%s in Vault at %s (KV v2 mount %r)"
                         % (fqrn, mount, path, client.url, mount))
    missing = [field for field in fields if not isinstance(data.get(field), str) or not data.get(field)]
    if missing:
        raise VaultError("the keys of %s at %s/%s lack field%s %s (present: %s)" % (
            fqrn, mount, path, "s" if len(missing) > 1 else "", ", ".join(missing),
            ", ".join(sorted(data)) or "none"))
    return dict((field, data[field]) for field in fields)


def read_repository_keys(client, params, fqrn, fields):
    """Read the repository's key ``fields`` from ``<kv_mount>/<vault_keys_path>`` with a logged-in ``client``
    (``VaultClient.login``: one login for every repository of a batch, logged out by the module at its end).

    Returns ({field: text}, the secret's path as shown to the operator)."""
    path = vault_keys_path(fqrn, params["subject"], params["group"])
    mount = params["kv_mount"]
    return repository_key_material(client, mount, path, fqrn, fields), "%s/%s" % (mount, path)
