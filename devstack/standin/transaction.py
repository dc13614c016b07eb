"""``transaction``, ``publish`` and ``abort``: opening a lease, committing the union dir, discarding it.

Gateway sessions as in cvmfs/publish/repository_session.cc: a present ``session_token`` is reused without asking
the gateway (so a lone token left by a crash makes the next transaction commit on a lease that may be gone);
``abort`` drops the lease of the token it finds, even when no transaction is open (then it still exits 22).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
import sys
import time

from .common import (
    EXIT_EBUSY, EXIT_EEXIST, EXIT_EINTR, EXIT_EINVAL, EXIT_ENOENT, EXIT_ENOTDIR, PROG, StandinError, confirm,
    is_within, open_fds_below, refuse_cwd_inside, write_text_atomic,
)
from .gateway import Gateway
from .local import Local, open_repository, require_complete
from .tree import Hasher, refuse_symlink_components, restore, scan

RETRY_INTERVAL_S = 0.1


def sync_union(local: Local, gateway: Gateway, reason: str | None = None) -> list:
    """Bring the union dir to the newest published revision (another publisher may have published)."""
    hasher = Hasher(local.load_stat_cache())
    changed = restore(local.union, gateway.manifest(), gateway, hasher)
    local.save_stat_cache(hasher.cache)
    local.set_mounted_revision(gateway.current())
    if changed and reason:
        print(f"{PROG}: {reason}: {len(changed)} path(s) put back, e.g. {changed[0]!r}", file=sys.stderr)
    return changed


def check_gateway_key(local: Local) -> None:
    """`transaction` switches to the repository owner before reading the .gw key: the owner must be able to."""
    path = os.path.join(local.keys_dir, local.fqrn + ".gw")
    try:
        info = os.stat(path)
    except OSError as error:
        raise StandinError(f"cannot read gateway key: /etc/cvmfs/keys/{local.fqrn}.gw ({error.strerror})") from None
    try:
        user = pwd.getpwnam(local.owner())
    except KeyError:
        raise StandinError(f"No write permission to repository: owner {local.owner()!r} does not exist") from None
    readable = (user.pw_uid == 0 or (info.st_uid == user.pw_uid and info.st_mode & stat.S_IRUSR)
                or (info.st_gid == user.pw_gid and info.st_mode & stat.S_IRGRP) or info.st_mode & stat.S_IROTH)
    if not readable:
        raise StandinError(f"cannot read gateway key: /etc/cvmfs/keys/{local.fqrn}.gw is not readable by the "
                           f"repository owner {user.pw_name} (owner uid {info.st_uid}, mode "
                           f"{stat.S_IMODE(info.st_mode):04o})")


def open_transaction(local: Local, lease_path: str) -> None:
    """Callers hold the gateway lock."""
    require_complete(local)
    gateway = local.gateway()
    if local.in_transaction():
        raise StandinError("CernVM-FS transaction error: another transaction is already open", EXIT_EEXIST)
    token = local.read_token()
    if token is None:  # Session::Acquire: only without a token does it ask the gateway
        check_gateway_key(local)
        token = gateway.acquire(lease_path, owner=local.spool, publisher=local.publisher())
    try:
        if local.settings().get("local_revision") == gateway.current():
            sync_union(local, gateway, reason="discarded changes made to the union dir outside a transaction "
                                              "(the real union mount is read-only then)")
        else:
            sync_union(local, gateway)
        if lease_path:
            check_lease_parent(local, gateway.manifest(), lease_path)
    except StandinError:
        gateway.release(token)  # TransactionRetry drops the session on any failure but 17
        with contextlib.suppress(FileNotFoundError):
            os.unlink(local.session_token)
        raise
    write_text_atomic(local.session_token, token + "\n", mode=0o600)
    write_text_atomic(local.transaction_lock, f"{local.fqrn}/{lease_path}\n")


def check_lease_parent(local: Local, manifest: dict, lease_path: str) -> None:
    """The real tool disallows transactions on paths whose parent does not exist (repository_transaction.cc)."""
    parent = lease_path.rpartition("/")[0]
    if parent == "":
        return
    entry = manifest.get(parent)
    if entry is None:
        raise StandinError(f"CernVM-FS transaction error: cannot open transaction on non-existing path /{parent} "
                           f"(lease {local.fqrn}/{lease_path})", EXIT_ENOENT)
    if entry["type"] != "dir":
        raise StandinError(f"CernVM-FS transaction error: cannot open transaction on /{parent}, which is not a "
                           f"directory (lease {local.fqrn}/{lease_path})", EXIT_ENOTDIR)


def check_before_publish(local: Local, force: bool) -> None:
    """publish.sh's checks on the caller, in its order; each leaves the transaction open."""
    if not local.in_transaction():
        raise StandinError(f"Repository {local.fqrn} is not in a transaction", stdout=True)
    writable, read_only = open_fds_below(local.union)
    if writable:
        raise StandinError(f"Open writable file descriptors on {local.fqrn} (e.g. pid {writable[0][0]}: "
                           f"{writable[0][1]})", stdout=True)
    refuse_cwd_inside(local.union, local.fqrn)
    if read_only and not force and os.environ.get("CVMFS_FORCE_REMOUNT_WARNING") != "false":
        print(f"\nWARNING! There are open read-only file descriptors in /cvmfs/{local.fqrn}\n"
              + "".join(f"  pid {pid}: {path}\n" for pid, path in read_only[:10]))
        if not confirm("         Do you want to proceed anyway?"):
            raise StandinError("aborted.", stdout=True)


def publish_transaction(local: Local, log_fields: dict) -> int:
    """Scan the lease path of the union dir into a new revision, close the transaction. Returns the revision.
    Callers hold the gateway lock. Any failure leaves the transaction open."""
    gateway = local.gateway()
    if not local.in_transaction():
        raise StandinError(f"Repository {local.fqrn} is not in a transaction", stdout=True)
    token = local.read_token()
    lease = gateway.lease(token) if token else None
    if lease is None:
        raise StandinError(f"the gateway rejected the commit of {local.fqrn}: the lease of this session is "
                           "unknown or expired (invalid_token); the transaction stays open, abort it")
    scope = lease["path"]
    refuse_symlink_components(local.union, scope, include_last=False, what="the lease path")
    hasher = Hasher(local.load_stat_cache())
    scanned = scan(local.union, scope, hasher, gateway)
    previous = gateway.manifest()
    # Like the gateway's receiver: only changes inside the lease path are merged.
    manifest = {rel: entry for rel, entry in previous.items() if not is_within(rel, scope)}
    manifest.update(scanned)
    changed = sorted(rel for rel in set(previous) | set(manifest) if previous.get(rel) != manifest.get(rel))
    revision = gateway.current() + 1
    gateway.write_revision(revision, manifest, dict(
        log_fields, revision=revision, publisher=local.publisher(), lease_path=scope, changed=changed,
        hashed=hasher.hashed))
    gateway.release(token)
    os.unlink(local.session_token)
    os.unlink(local.transaction_lock)
    # Changes outside the lease were not merged: the union dir shows what was published, as after a remount.
    restore(local.union, manifest, gateway, hasher)
    local.save_stat_cache(hasher.cache)
    local.set_mounted_revision(revision)
    return revision


def abort_transaction(local: Local) -> None:
    """Callers hold the gateway lock."""
    gateway = local.gateway()
    token = local.read_token()
    if token:
        gateway.release(token)
        os.unlink(local.session_token)
    if not local.in_transaction():
        raise StandinError(f"Repository {local.fqrn} is not in a transaction", EXIT_EINVAL)
    sync_union(local, gateway)
    os.unlink(local.transaction_lock)


def with_retry(timeout: int | None, attempt):
    """`-t <s>` of `cvmfs_server transaction`: retry while busy (16) or already open (17); 0 means forever."""
    deadline = None if not timeout else time.monotonic() + timeout
    announced = False
    while True:
        try:
            return attempt()
        except StandinError as error:
            retry = timeout is not None and error.exit_code in (EXIT_EBUSY, EXIT_EEXIST)
            if not retry or (deadline is not None and time.monotonic() >= deadline):
                raise
            if not announced:
                print(f"{PROG}: {error}; repository busy, retrying for "
                      f"{'ever' if not timeout else f'up to {timeout} s'}", file=sys.stderr, flush=True)
                announced = True
            time.sleep(RETRY_INTERVAL_S)


def cmd_transaction(root: str, args) -> int:
    if args.template:
        raise StandinError("-T (template transactions) is not supported by the stand-in")
    local, lease_path = open_repository(root, args.repository)

    def attempt():
        with local.gateway().locked():
            open_transaction(local, lease_path)

    with_retry(args.retry_timeout, attempt)
    print(f"Opened transaction on {local.fqrn}{'/' + lease_path if lease_path else ''} ({PROG})")
    return 0


def cmd_publish(root: str, args) -> int:
    local, _ = open_repository(root, args.repository)  # a subpath is ignored, as by the real tool
    check_before_publish(local, args.force)
    with local.gateway().locked():
        publish_transaction(local, {"command": "publish", "tag": args.tag, "message": args.message})
    print("Changes submitted to repository gateway")  # gateway mode prints no revision number
    return 0


def cmd_abort(root: str, args) -> int:
    local, _ = open_repository(root, args.repository)
    refuse_cwd_inside(local.union, local.fqrn)
    if local.in_transaction() and not args.force:
        if not confirm(f"You are about to DISCARD ALL CHANGES OF THE CURRENT TRANSACTION for {local.fqrn}! "
                       "Are you sure"):
            raise StandinError("aborted by the user; the transaction stays open", EXIT_EINTR)
    with local.gateway().locked():
        abort_transaction(local)
    print(f"Transaction on {local.fqrn} aborted ({PROG})")
    return 0
