"""``ingest``: a tar (or one deletion) as a revision of its own, as cvmfs_server_ingest.sh does in gateway mode.

- ``-t <tar> -b <dir>`` opens a transaction on the lease ``<fqrn>/<dir>``, unpacks the tar **merging** into
  ``<dir>``, publishes; ``-d <path>`` alone deletes one path on the lease ``<fqrn>/<path>``;
- ``-t`` with ``-d``, or several ``-d``, die (1) before any transaction: a gateway cannot do them in one;
- the tar must be **uncompressed** (swissknife ingest reads plain tar; ``-t -`` reads one from stdin);
- failing to open the transaction (busy lease, one already open, missing parent) is 1, never 16/17;
- any failure after that aborts the transaction: nothing is published.

The stand-in is stricter than the real tool in one respect (its tests say so): members escaping the base
directory (absolute, ``..``, through a symlink) and device/fifo members are refused instead of unpacked.
"""

from __future__ import annotations

import os
import pwd
import shutil
import sys

from .common import PROG, StandinError, normalize_repo_path, refuse_cwd_inside
from .local import open_repository
from .transaction import abort_transaction, open_transaction, publish_transaction
from .tree import refuse_symlink_components, remove_path


def cmd_ingest(root: str, args) -> int:
    import tarfile  # only ingest needs it: every other command starts faster without

    local, _ = open_repository(root, args.repository)
    deletes = args.delete or []
    if args.tar_file is None and args.base_dir is None and not deletes:
        raise StandinError("Please provide some parameters, use -t $TAR_FILE to provide the tar to extract -b "
                           "$BASE_DIR to provide where to extract the tar and -d $TO_DELETE to provide what to delete")
    if args.tar_file is None and args.base_dir is not None:
        raise StandinError("Please provide the tarball to extract, use -t $TARBALL_PATH")
    if args.tar_file is not None and args.base_dir is None:
        raise StandinError("Please set the base directory where to extract the tarball, use -b $BASE_DIR")
    if len(deletes) > 1:
        raise StandinError("Could not delete multiple paths using a gateway in a single transaction.")
    if args.tar_file is not None and deletes:
        raise StandinError("Could not delete and add a file in the same transaction while using gateway.")
    base_dir = normalize_repo_path(args.base_dir or "", "base directory")
    to_delete = normalize_repo_path(deletes[0], "path to delete") if deletes else None
    if to_delete == "":
        raise StandinError("ingest -d: refusing to delete the repository root")
    lease_path = base_dir if args.tar_file is not None else to_delete
    gateway = local.gateway()
    with gateway.locked():
        try:
            open_transaction(local, lease_path)
        except StandinError as error:
            raise StandinError(f"{error}\nImpossible to start a transaction") from None
    try:
        refuse_cwd_inside(local.union, local.fqrn)
        if to_delete is not None:
            refuse_symlink_components(local.union, to_delete, include_last=False, what="the path to delete")
            target = os.path.join(local.union, to_delete)
            if os.path.lexists(target):
                remove_path(target)
        else:
            refuse_symlink_components(local.union, base_dir, include_last=True, what="the base directory")
            os.makedirs(os.path.join(local.union, base_dir), exist_ok=True)
            extract_tar(args.tar_file, local.union, base_dir, owner_ids(local.owner()))
            if args.catalog:
                open(os.path.join(local.union, base_dir, ".cvmfscatalog"), "a").close()
        with gateway.locked():
            publish_transaction(local, {"command": "ingest", "base_dir": base_dir, "deleted": to_delete})
    except BaseException as error:
        with gateway.locked():
            abort_transaction(local)
        if isinstance(error, StandinError):
            raise StandinError(f"Synchronization failed, nothing published: {error}") from None
        if isinstance(error, (tarfile.TarError, EOFError, OSError)):
            raise StandinError(f"Synchronization failed, nothing published: cannot read {args.tar_file} as an "
                               f"uncompressed tar: {error}") from None
        raise
    print("Changes submitted to repository gateway")
    return 0


def owner_ids(owner: str) -> tuple | None:
    """(uid, gid) ingest gives its files (the repository owner, as without -k), when it can: running as root."""
    if os.getuid() != 0:
        return None
    try:
        user = pwd.getpwnam(owner)
    except KeyError:
        raise StandinError(f"Default CVMFS_USER {owner} for the repo does not exist") from None
    return user.pw_uid, user.pw_gid


def extract_tar(tar_file: str, union: str, base_dir: str, ids: tuple | None = None) -> None:
    """Unpack an uncompressed tar ('-' is stdin) under base_dir (merging), refusing escaping members."""
    import tarfile

    base_path = os.path.join(union, base_dir) if base_dir else union
    stream = sys.stdin.buffer if tar_file == "-" else None
    # "r|": plain tar only, streamed (stdin and files alike, in one pass); a compressed tar is a ReadError.
    with tarfile.open(name=None if stream else tar_file, fileobj=stream, mode="r|") as archive:
        for member in archive:
            parts = member_parts(member.name)
            if not parts:
                continue  # the base dir itself ('.' or './')
            target = os.path.join(base_path, *parts)
            ensure_no_symlink_parent(base_path, parts, member.name)
            if member.isdir():
                if os.path.lexists(target) and not os.path.isdir(target):
                    os.unlink(target)
                os.makedirs(target, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.lexists(target):
                remove_path(target)
            if member.isfile():
                with archive.extractfile(member) as source, open(target, "wb") as output:
                    shutil.copyfileobj(source, output)
                os.chmod(target, member.mode & 0o777)
            elif member.issym():
                check_link_target(parts, member.linkname, member.name)
                os.symlink(member.linkname, target)
            elif member.islnk():
                # Hard links are broken into independent files, as CVMFS does.
                source = os.path.join(base_path, *member_parts(member.linkname))
                shutil.copy2(source, target, follow_symlinks=False)
            if ids:
                os.chown(target, *ids, follow_symlinks=False)
            else:
                raise StandinError(f"tar member {member.name!r} is a device or fifo; "
                                   f"the stand-in ({PROG}) does not ingest those")


def member_parts(name: str) -> list:
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if name.startswith("/") or ".." in parts:
        raise StandinError(f"tar member {name!r} escapes the base directory")
    return parts


def ensure_no_symlink_parent(base_path: str, parts: list, name: str) -> None:
    """A member must not be written through a symlink another member created (e.g. 'a' -> /etc, then 'a/passwd')."""
    path = base_path
    for part in parts[:-1]:
        path = os.path.join(path, part)
        if os.path.islink(path):
            raise StandinError(f"tar member {name!r} escapes the base directory through a symbolic link")


def check_link_target(parts: list, link_target: str, name: str) -> None:
    resolved = os.path.normpath(os.path.join(*parts[:-1], link_target) if len(parts) > 1 else link_target)
    if link_target.startswith("/") or resolved == ".." or resolved.startswith("../"):
        raise StandinError(f"tar member {name!r} is a symbolic link pointing outside the base directory "
                           f"({link_target!r})")
