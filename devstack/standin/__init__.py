"""Stand-in for the CernVM-FS ``cvmfs_server`` tool in gateway-publisher mode (development and tests only).

The real CVMFS server tools need root, FUSE, OverlayFS and a repository gateway; none of that is available here.
This stand-in reproduces the command-line contract the collection relies on
(``shared/docs/cvmfs-server-contract.md``) as strictly as the real tool: every failure a production caller can
meet, with the real exit code. Every real path is mapped below ``$CVMFS_STANDIN_ROOT`` (``/cvmfs/x`` ->
``$ROOT/cvmfs/x``), so it runs unprivileged and two stacks can run side by side.

Where things are (one file per part a newcomer would look for):
- ``cli.py``: the command line and ``main`` (``devstack/cvmfs_server`` calls it);
- ``mkfs.py``: ``mkfs`` (config first, then keys, spool, mount: a failure leaves a half-created repository),
  ``rmfs`` (keeps the gateway lease), ``list``;
- ``transaction.py``: ``transaction`` (leases, ``session_token`` reuse, ``-t`` retries), ``publish`` (cwd and open
  file descriptor checks, ``-f``; prints no revision), ``abort``;
- ``ingest.py``: ``ingest`` as in gateway mode (plain tar only, no ``-t`` with ``-d``, one revision each);
- ``gateway.py``: the shared gateway folder (revisions, content store, leases that expire);
- ``local.py``: one publisher's config, keys, spool, union dir, and the ``rdonly`` revision attribute;
- ``tree.py``: scanning the union dir into a manifest and restoring it (with a stat cache);
- ``common.py``: exit codes, errors, atomic writes, the cwd / open-fd checks on the caller.

What it reproduces: real transactions (``publish`` records the union dir as a new numbered revision, ``abort``
restores the last published tree exactly); the published revision in the ``user.revision`` extended attribute of
``/var/spool/cvmfs/<fqrn>/rdonly`` (what ``attr -qg revision`` reads); revisions in a "gateway" folder
(``$CVMFS_STANDIN_GATEWAY_DIR``, default ``$ROOT/srv/cvmfs-standin/gateway``: blobs ``<fqrn>/data/<sha256>``,
manifests ``<fqrn>/revisions/<N>.json`` = {path: {"type": "file", "sha256", "size", "mode"} | {"type": "dir"} |
{"type": "symlink", "target"}}, ``<fqrn>/current``, ``<fqrn>/publish.log``); leases that conflict on overlapping
paths from any publisher, including one this host left behind, until they expire
(``$CVMFS_STANDIN_LEASE_SECONDS``, default 7200); publishers sharing one gateway folder see each other's revisions
and a publish merges only changes inside its lease path; ``publish`` refuses what the real sync engine never
publishes (``.wh.*``, top-level ``.cvmfs``, a ``.cvmfscatalog`` that is not a regular file, special files);
the owner (``-o``) must exist and must be able to read the ``.gw`` key; keys and union dir are chowned to it when
the stand-in runs as root.

What it does not reproduce: no FUSE or OverlayFS (the union dir stays writable outside transactions; such writes
are discarded with a warning when the next transaction opens), no HTTP gateway and no HMAC (the gateway folder
is shared through the file system: no "gateway unreachable", 5), no signing, whitelists (22), catalogs, tags,
garbage collection, hooks, default-domain completion of names, no root check. Published files record the uid
that wrote them (manifest ``uid``: a file written as root is published as uid 0, as by the real tool); ingest
gives its files to the owner only when the stand-in runs as root.

Stricter than the real tool (tests say so by name): ingest refuses tar members escaping the base directory and
device/fifo members; mkfs refuses upstream types other than ``gw`` and a missing ``-k``.

The functions below are the read API for tests.
"""

from __future__ import annotations

import json

from .cli import main
from .common import StandinError, read_conf
from .gateway import Gateway
from .local import REVISION_XATTR, Local

__all__ = ["main", "StandinError", "read_conf", "current_revision", "published_tree", "published_manifest",
           "read_published_file", "in_transaction", "publish_log", "mounted_revision", "REVISION_XATTR"]


def _gateway_for(root: str, fqrn: str, gateway_dir: str | None) -> Gateway:
    return Gateway(gateway_dir, fqrn) if gateway_dir else Local(root, fqrn).gateway()


def current_revision(root: str, fqrn: str, gateway_dir: str | None = None) -> int:
    """The newest revision the gateway holds."""
    return _gateway_for(root, fqrn, gateway_dir).current()


def mounted_revision(root: str, fqrn: str) -> int:
    """The revision this publisher's rdonly mount shows (its ``user.revision`` attribute)."""
    import os

    return int(os.getxattr(Local(root, fqrn).rdonly, REVISION_XATTR))


def published_tree(root: str, fqrn: str, rev: int | None = None, gateway_dir: str | None = None) -> dict:
    """{relative path (no leading '/'): sha256 | 'dir' | 'link:<target>'} of revision `rev` (default: newest)."""
    tree = {}
    for rel, entry in _gateway_for(root, fqrn, gateway_dir).manifest(rev).items():
        if entry["type"] == "file":
            tree[rel] = entry["sha256"]
        elif entry["type"] == "dir":
            tree[rel] = "dir"
        else:
            tree[rel] = "link:" + entry["target"]
    return tree


def published_manifest(root: str, fqrn: str, rev: int | None = None, gateway_dir: str | None = None) -> dict:
    """The full manifest entries (with size and mode) of revision `rev`."""
    return _gateway_for(root, fqrn, gateway_dir).manifest(rev)


def read_published_file(root: str, fqrn: str, path: str, rev: int | None = None,
                        gateway_dir: str | None = None) -> bytes:
    gateway = _gateway_for(root, fqrn, gateway_dir)
    rel = path.strip("/")
    entry = gateway.manifest(rev).get(rel)
    if entry is None or entry["type"] != "file":
        raise StandinError(f"/{rel} is not a published file of {fqrn} (revision {rev or gateway.current()})")
    with open(gateway.blob(entry["sha256"]), "rb") as handle:
        return handle.read()


def in_transaction(root: str, fqrn: str) -> bool:
    return Local(root, fqrn).in_transaction()


def publish_log(root: str, fqrn: str, gateway_dir: str | None = None) -> list:
    """One dict per revision: revision, time, command, publisher, lease_path, changed (paths), hashed (files read)."""
    with open(_gateway_for(root, fqrn, gateway_dir).log_file, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
