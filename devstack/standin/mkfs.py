"""``mkfs``, ``rmfs`` and ``list``: creating and removing a gateway publisher, in the order of the real scripts.

mkfs (cvmfs_server_mkfs.sh) checks its arguments, the owner and whether keys would be overwritten, then writes
the configuration **first**, imports the keys, creates the spool and mounts: a failure after the configuration
(e.g. a missing key file) leaves a half-created repository whose ``server.conf`` exists.
rmfs removes configuration, spool, union dir (and keys unless ``-p``) but does **not** release a gateway lease.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil

from .common import EXIT_USAGE, FQRN_PATTERN, PROG, StandinError, confirm, read_conf
from .gateway import Gateway, default_gateway_dir
from .local import Local, open_repository
from .transaction import sync_union

GATEWAY_KEY_SUFFIXES = (".crt", ".pub", ".gw")
ALL_KEY_SUFFIXES = (".masterkey", ".pub", ".key", ".crt", ".gw")


def cmd_mkfs(root: str, args) -> int:
    fqrn = args.fqrn
    if not FQRN_PATTERN.match(fqrn):
        raise StandinError(f"invalid repository name {fqrn!r}: up to 60 characters from [A-Za-z0-9_.-], "
                           "starting with a letter or digit")
    local = Local(root, fqrn)
    if local.exists():
        raise StandinError(f"The repository {fqrn} already exists")
    if not args.stratum0:
        raise StandinError("mkfs needs -w <stratum0 url> (the gateway's repository URL)")
    upstream = (args.upstream or "").split(",")
    if len(upstream) != 3:
        raise StandinError(f"-u {args.upstream!r} is not a valid upstream: expected exactly three comma-separated "
                           "fields <type>,<tmp dir>,<config>, e.g. gw,/srv/cvmfs/<fqrn>/data/txn,http://gw:4929/api/v1",
                           EXIT_USAGE)
    if upstream[0] != "gw":
        raise StandinError(f"-u {args.upstream!r}: the stand-in only makes gateway publishers (upstream type 'gw')")
    owner = args.owner or pwd.getpwuid(os.getuid()).pw_name
    try:
        user = pwd.getpwnam(owner)
    except KeyError:
        raise StandinError(f"No user {owner}") from None
    source_dir = check_key_import(local, args.keys)
    publisher = os.environ.get("CVMFS_STANDIN_PUBLISHER") or os.uname().nodename
    # ---> from here on, things change; a failure leaves what was done so far (as the real script does)
    write_config(local, args, owner, publisher)
    import_keys(local, source_dir, user)
    gateway = Gateway(default_gateway_dir(local.root), fqrn)
    with gateway.locked():
        if not gateway.exists():
            gateway.create()
        for sub in ("scratch/current", "scratch/wastebin", "rdonly", "tmp", "cache", "ofs_workdir"):
            os.makedirs(os.path.join(local.spool, sub), exist_ok=True)
        local.save_settings({"gateway_dir": gateway.base, "publisher": publisher})
        gateway.register(local.spool, publisher)
        sync_union(local, gateway)
        chown_if_root(local.union, user)
    print(f"Created repository {fqrn} ({PROG}, gateway publisher {publisher}, revision {gateway.current()})")
    return 0


def check_key_import(local: Local, import_dir: str | None) -> str:
    """mkfs.sh before anything changes: any of the keys already in the keys folder while -k names another folder
    dies, even when the content is identical. Returns the folder to import from."""
    names = [local.fqrn + suffix for suffix in GATEWAY_KEY_SUFFIXES]
    present = [name for name in names if os.path.isfile(os.path.join(local.keys_dir, name))]
    if present:
        if import_dir and os.path.realpath(import_dir) != os.path.realpath(local.keys_dir):
            raise StandinError(f"Importing keys from '{import_dir}' would overwrite keys in '/etc/cvmfs/keys' "
                               f"({', '.join(present)} already there)")
        return local.keys_dir
    if not import_dir:
        raise StandinError("the stand-in makes gateway publishers only: import the keys with -k <dir> "
                           f"({', '.join(names)})")
    return os.path.abspath(import_dir)


def import_keys(local: Local, source_dir: str, user: pwd.struct_passwd) -> None:
    """import_keychain of cvmfs_server_ssl.sh: copy each key unless present, chmod, chown to the owner."""
    os.makedirs(local.keys_dir, exist_ok=True)
    for suffix in GATEWAY_KEY_SUFFIXES:
        name = local.fqrn + suffix
        target = os.path.join(local.keys_dir, name)
        if not os.path.isfile(target):
            source = os.path.join(source_dir, name)
            if not os.path.isfile(source):
                raise StandinError(f"importing {name} ... fail! (key file {source} is missing: a gateway "
                                   f"publisher needs {local.fqrn}.crt, .pub and .gw)")
            shutil.copyfile(source, target)
        os.chmod(target, 0o400 if suffix == ".gw" else 0o444)
        chown_if_root(target, user)


def chown_if_root(path: str, user: pwd.struct_passwd) -> None:
    """The real tool runs as root and gives the owner what it must read or write; unprivileged, we cannot."""
    if os.getuid() == 0:
        os.chown(path, user.pw_uid, user.pw_gid)


def write_config(local: Local, args, owner: str, publisher: str) -> None:
    fqrn = local.fqrn
    server = {
        "CVMFS_REPOSITORY_NAME": fqrn,
        "CVMFS_REPOSITORY_TYPE": "stratum0",
        "CVMFS_USER": owner,
        "CVMFS_UNION_DIR": f"/cvmfs/{fqrn}",
        "CVMFS_SPOOL_DIR": f"/var/spool/cvmfs/{fqrn}",
        "CVMFS_STRATUM0": args.stratum0,
        "CVMFS_UPSTREAM_STORAGE": args.upstream,
        "CVMFS_UNION_FS_TYPE": args.unionfs or "overlayfs",
        "CVMFS_HASH_ALGORITHM": args.hash_algorithm or "sha1",
        "CVMFS_COMPRESSION_ALGORITHM": "default",
        "CVMFS_AUTO_TAG": "false" if args.no_autotag else "true",
        "CVMFS_GARBAGE_COLLECTION": "true" if args.gc else "false",
        "CVMFS_AUTOCATALOGS": "false",
    }
    client = {
        "CVMFS_CACHE_BASE": f"/var/spool/cvmfs/{fqrn}/cache",
        "CVMFS_RELOAD_SOCKETS": f"/var/spool/cvmfs/{fqrn}/cache",
        "CVMFS_QUOTA_LIMIT": "-1",
        "CVMFS_MOUNT_DIR": "/cvmfs",
        "CVMFS_SERVER_URL": args.stratum0,
        "CVMFS_HTTP_PROXY": args.proxy or "DIRECT",
        "CVMFS_PUBLIC_KEY": f"/etc/cvmfs/keys/{fqrn}.pub",
        "CVMFS_CHECK_PERMISSIONS": "yes",
        "CVMFS_IGNORE_SIGNATURE": "no",
        "CVMFS_AUTO_UPDATE": "no",
        "CVMFS_MOUNT_RW": "yes",
    }
    header = f"# Written by {PROG} mkfs for publisher {publisher}; paths are the real ones, the stand-in maps them " \
             f"below {local.root}\n"
    os.makedirs(local.config_dir)
    for name, values in (("server.conf", server), ("client.conf", client)):
        with open(os.path.join(local.config_dir, name), "w", encoding="utf-8") as handle:
            handle.write(header + "".join(f"{key}={value}\n" for key, value in values.items()))


def cmd_rmfs(root: str, args) -> int:
    local, _ = open_repository(root, args.repository)
    if not args.force and not confirm(f"You are about to WIPE OUT THE CVMFS REPOSITORY {local.fqrn} "
                                      f"{'' if args.preserve_keys else 'INCLUDING SIGNING KEYS'}! Are you sure"):
        raise StandinError(f"not removing {local.fqrn}")
    gateway = local.gateway()
    with gateway.locked():
        # The gateway lease of an open transaction is not released: it blocks until it expires.
        if gateway.unregister(local.spool):
            shutil.rmtree(gateway.dir, ignore_errors=True)
        for path in (local.config_dir, local.spool, local.union):
            shutil.rmtree(path, ignore_errors=True)
        if not args.preserve_keys:
            for suffix in ALL_KEY_SUFFIXES:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(local.keys_dir, local.fqrn + suffix))
    print(f"Repository {local.fqrn} removed ({PROG}{', keys kept' if args.preserve_keys else ''})")
    return 0


def cmd_list(root: str, args) -> int:
    repositories_dir = os.path.join(os.path.abspath(root), "etc", "cvmfs", "repositories.d")
    names = sorted(os.listdir(repositories_dir)) if os.path.isdir(repositories_dir) else []
    for fqrn in names:
        local = Local(root, fqrn)
        if not os.path.isfile(local.server_conf):
            continue
        upstream_type = read_conf(local.server_conf).get("CVMFS_UPSTREAM_STORAGE", "").split(",")[0]
        state = " - in transaction" if local.in_transaction() else ""
        print(f"{fqrn} (stratum0 / {upstream_type}{state})")
    return 0
