"""Stand-in for the CernVM-FS ``cvmfs_server`` tool in gateway-publisher mode (development and tests only).

The real CVMFS server tools need root, FUSE, OverlayFS and a repository gateway; none of that is available here.
This stand-in reproduces the command-line contract the collection relies on
(``shared/docs/cvmfs-server-contract.md``): the commands ``mkfs``, ``transaction``, ``publish``, ``abort``,
``ingest``, ``list`` and ``rmfs``, their exit codes, the files an operator or module looks at
(``/etc/cvmfs/repositories.d/<fqrn>/server.conf``, ``/etc/cvmfs/keys/<fqrn>.{crt,pub,gw}``,
``/var/spool/cvmfs/<fqrn>/in_transaction.lock`` and ``session_token``, the union dir ``/cvmfs/<fqrn>``), and
gateway leases that make concurrent publishers conflict as they would against a real gateway.

Every real path is mapped below ``$CVMFS_STANDIN_ROOT`` (``/cvmfs/x`` -> ``$ROOT/cvmfs/x``), so it runs
unprivileged and two stacks can run side by side.

What it reproduces:
- transactions are real: the union dir is a plain directory; ``publish`` records its content as a new numbered
  revision, ``abort`` puts back exactly the last published tree (rewriting only what differs);
- published revisions live in a "gateway" folder (``$CVMFS_STANDIN_GATEWAY_DIR``, default
  ``$ROOT/srv/cvmfs-standin/gateway``): content-addressed blobs ``<fqrn>/data/<sha256>``, one manifest per revision
  ``<fqrn>/revisions/<N>.json`` ({path: {"type": "file", "sha256", "size", "mode"} | {"type": "dir"} |
  {"type": "symlink", "target"}}), ``<fqrn>/current`` and ``<fqrn>/publish.log`` (one JSON line per revision);
- leases: a transaction on ``<fqrn>/<path>`` conflicts (exit 16) with an open transaction of another publisher on an
  overlapping path; publishers sharing one gateway folder see each other's revisions (``transaction`` first brings
  the union dir up to the newest revision) and a publish only merges changes inside its lease path, like the
  gateway's receiver;
- ``publish`` refuses what the real sync engine would refuse or never publish: overlay whiteouts ``.wh.*``, a
  top-level ``.cvmfs``, a ``.cvmfscatalog`` that is not a regular file, special files;
- publishing costs in proportion to what changed: a per-spool stat cache (size, mtime, ctime, inode) avoids
  re-hashing unchanged files.

What it does not reproduce: no FUSE or OverlayFS (the union dir stays writable outside transactions; such writes
are discarded with a warning when the next transaction opens), no HTTP gateway and no HMAC (the gateway folder
is shared through the file system), no signing, whitelists, catalogs, tags, garbage collection, lease expiry,
hooks, default-domain completion of names, or root/owner checks (``-o`` is recorded, never used to chown).

The functions ``current_revision``, ``published_tree``, ``read_published_file``, ``in_transaction`` and
``publish_log`` are the read API for tests. ``devstack/cvmfs_server`` is the executable; it calls ``main``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import time

PROG = "cvmfs_server (stand-in)"
FQRN_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,59}$")
GATEWAY_KEY_SUFFIXES = (".crt", ".pub", ".gw")
ALL_KEY_SUFFIXES = (".masterkey", ".pub", ".key", ".crt", ".gw")
# A file changed within this window before a scan may keep the same (size, mtime, ctime) after a later write
# (coarse file-system clocks), so its hash is not cached across runs ("racily clean", as git calls it).
# Tests set CVMFS_STANDIN_RACY_WINDOW_MS=0 to observe the cache deterministically.
RACY_WINDOW_NS = int(os.environ.get("CVMFS_STANDIN_RACY_WINDOW_MS", "1000")) * 1_000_000
RETRY_INTERVAL_S = 0.1

# Exit codes of the real tool (cmd_transaction.cc, cmd_abort.cc, shell `die`).
EXIT_FAIL = 1
EXIT_ENOENT = 2
EXIT_EINTR = 4
EXIT_EBUSY = 16
EXIT_EEXIST = 17
EXIT_ENOTDIR = 20
EXIT_EINVAL = 22


class StandinError(Exception):
    """A failure with the exit code the real cvmfs_server uses for it."""

    def __init__(self, message: str, exit_code: int = EXIT_FAIL):
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------------------------------------------
# Paths


def default_gateway_dir(root: str) -> str:
    return os.path.abspath(
        os.environ.get("CVMFS_STANDIN_GATEWAY_DIR") or os.path.join(root, "srv", "cvmfs-standin", "gateway")
    )


class Local:
    """One publisher's side of a repository: config, keys, spool and union dir, all below the stand-in root."""

    def __init__(self, root: str, fqrn: str):
        self.root = os.path.abspath(root)
        self.fqrn = fqrn
        self.config_dir = os.path.join(self.root, "etc", "cvmfs", "repositories.d", fqrn)
        self.keys_dir = os.path.join(self.root, "etc", "cvmfs", "keys")
        self.spool = os.path.join(self.root, "var", "spool", "cvmfs", fqrn)
        self.union = os.path.join(self.root, "cvmfs", fqrn)
        self.transaction_lock = os.path.join(self.spool, "in_transaction.lock")
        self.session_token = os.path.join(self.spool, "session_token")
        self.stat_cache_file = os.path.join(self.spool, "standin-statcache.json")
        self.settings_file = os.path.join(self.spool, "standin.json")

    def exists(self) -> bool:
        return os.path.isdir(self.config_dir)

    def in_transaction(self) -> bool:
        return os.path.isfile(self.transaction_lock)

    def settings(self) -> dict:
        """What mkfs recorded (gateway folder, publisher name) plus the revision the union dir shows."""
        try:
            with open(self.settings_file, encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return {}

    def save_settings(self, settings: dict) -> None:
        write_json_atomic(self.settings_file, settings)

    def gateway(self) -> "Gateway":
        gateway_dir = self.settings().get("gateway_dir") or default_gateway_dir(self.root)
        return Gateway(gateway_dir, self.fqrn)

    def publisher(self) -> str:
        return self.settings().get("publisher") or os.uname().nodename

    def load_stat_cache(self) -> dict:
        try:
            with open(self.stat_cache_file, encoding="utf-8") as handle:
                return json.load(handle)
        except (FileNotFoundError, ValueError):
            return {}

    def save_stat_cache(self, cache: dict) -> None:
        write_json_atomic(self.stat_cache_file, cache)


class Gateway:
    """The shared side of a repository: published revisions, content store, leases, and the lock for all of it."""

    def __init__(self, gateway_dir: str, fqrn: str):
        self.base = os.path.abspath(gateway_dir)
        self.fqrn = fqrn
        self.dir = os.path.join(self.base, fqrn)
        self.data = os.path.join(self.dir, "data")
        self.revisions = os.path.join(self.dir, "revisions")
        self.current_file = os.path.join(self.dir, "current")
        self.log_file = os.path.join(self.dir, "publish.log")
        self.leases_file = os.path.join(self.dir, "leases.json")
        self.publishers_dir = os.path.join(self.dir, "publishers")
        # Outside the repository folder so that it outlives rmfs of the last publisher.
        self.lock_file = os.path.join(self.base, ".locks", fqrn + ".lock")

    @contextlib.contextmanager
    def locked(self):
        """Serialise every state change of this repository across processes and publishers."""
        os.makedirs(os.path.dirname(self.lock_file), exist_ok=True)
        with open(self.lock_file, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def exists(self) -> bool:
        return os.path.isfile(self.current_file)

    def current(self) -> int:
        try:
            with open(self.current_file, encoding="utf-8") as handle:
                return int(handle.read().strip())
        except FileNotFoundError:
            raise StandinError(f"repository {self.fqrn} has no published revision in {self.dir}") from None

    def manifest(self, revision: int | None = None) -> dict:
        revision = self.current() if revision is None else revision
        path = os.path.join(self.revisions, f"{revision}.json")
        try:
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            raise StandinError(f"repository {self.fqrn} has no revision {revision}") from None

    def blob(self, sha256: str) -> str:
        return os.path.join(self.data, sha256)

    def store(self, path: str) -> str:
        """Copy a file into the content store while hashing it (one read); returns its sha256."""
        os.makedirs(self.data, exist_ok=True)
        digest = hashlib.sha256()
        tmp = os.path.join(self.data, f".tmp-{os.urandom(16).hex()}")
        try:
            with open(path, "rb") as source, open(tmp, "wb") as target:
                for chunk in iter(lambda: source.read(1 << 20), b""):
                    digest.update(chunk)
                    target.write(chunk)
            sha256 = digest.hexdigest()
            if os.path.exists(self.blob(sha256)):
                os.unlink(tmp)
            else:
                os.chmod(tmp, 0o444)
                os.replace(tmp, self.blob(sha256))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return sha256

    def create(self) -> None:
        """Revision 0: the empty tree, as a new repository shows."""
        os.makedirs(self.revisions, exist_ok=True)
        os.makedirs(self.data, exist_ok=True)
        self.write_revision(0, {}, {"revision": 0, "command": "mkfs", "changed": []})

    def write_revision(self, revision: int, manifest: dict, log_entry: dict) -> None:
        write_json_atomic(os.path.join(self.revisions, f"{revision}.json"), manifest)
        write_text_atomic(self.current_file, f"{revision}\n")
        log_entry = dict(log_entry, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        with open(self.log_file, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(log_entry, sort_keys=True) + "\n")

    # Leases: [{"token", "path", "owner" (spool path: one per publisher and repository), "publisher", "since"}]
    def leases(self) -> list:
        try:
            with open(self.leases_file, encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return []

    def save_leases(self, leases: list) -> None:
        write_json_atomic(self.leases_file, leases)

    def register(self, local: Local, publisher: str) -> None:
        os.makedirs(self.publishers_dir, exist_ok=True)
        write_json_atomic(self.publisher_file(local), {"publisher": publisher, "spool": local.spool})

    def unregister(self, local: Local) -> bool:
        """Forget a publisher; True when no publisher is left (the published data can go)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.publisher_file(local))
        return not os.path.isdir(self.publishers_dir) or not os.listdir(self.publishers_dir)

    def publisher_file(self, local: Local) -> str:
        return os.path.join(self.publishers_dir, hashlib.sha256(local.spool.encode()).hexdigest()[:16] + ".json")


def write_text_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def write_json_atomic(path: str, data) -> None:
    write_text_atomic(path, json.dumps(data, sort_keys=True, separators=(",", ":")))


# ---------------------------------------------------------------------------------------------------------------
# Trees: scanning the union dir into a manifest, and putting a manifest back into the union dir


def normalize_repo_path(path: str, what: str) -> str:
    """'/a/b/' -> 'a/b'; '' or '/' -> '' (the repository root). Refuses '.', '..' and empty components."""
    parts = [part for part in path.split("/") if part != ""]
    if any(part in (".", "..") for part in parts):
        raise StandinError(f"invalid {what} {path!r}: '.' and '..' are not allowed", EXIT_EINVAL)
    return "/".join(parts)


def is_within(path: str, scope: str) -> bool:
    return scope == "" or path == scope or path.startswith(scope + "/")


def paths_overlap(first: str, second: str) -> bool:
    return is_within(first, second) or is_within(second, first)


def join_rel(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def stat_key(st: os.stat_result) -> list:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def hash_file(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class Hasher:
    """File hashes through the stat cache: unchanged files (same size, mtime, ctime, inode) are not read again."""

    def __init__(self, cache: dict):
        self.cache = cache  # rel -> stat_key + [sha256]; only entries that are safe to trust in a later run
        self.seen_now: dict = {}  # rel -> stat_key + [sha256], hashed in this run (may be racy for later runs)
        self.hashed = 0
        self.scan_start_ns = time.time_ns()

    def known(self, rel: str, st: os.stat_result) -> str | None:
        key = stat_key(st)
        for entry in (self.seen_now.get(rel), self.cache.get(rel)):
            if entry and entry[:4] == key:
                return entry[4]
        return None

    def remember(self, rel: str, st: os.stat_result, sha256: str, trusted: bool = False) -> None:
        entry = stat_key(st) + [sha256]
        self.seen_now[rel] = entry
        recent = max(st.st_mtime_ns, st.st_ctime_ns) >= self.scan_start_ns - RACY_WINDOW_NS
        if trusted or not recent:
            self.cache[rel] = entry
        else:
            self.cache.pop(rel, None)

    def forget_outside(self, manifest: dict) -> None:
        for rel in [rel for rel in self.cache if rel not in manifest]:
            del self.cache[rel]

    def sha256(self, rel: str, path: str, st: os.stat_result, gateway: Gateway | None = None) -> str:
        """The file's hash; with a gateway, also makes sure its content is in the store."""
        sha256 = self.known(rel, st)
        if sha256 is not None and (gateway is None or os.path.exists(gateway.blob(sha256))):
            return sha256
        self.hashed += 1
        sha256 = gateway.store(path) if gateway else hash_file(path)
        self.remember(rel, st, sha256)
        return sha256


def check_publishable(rel: str, name: str, st: os.stat_result) -> None:
    """What the real sync engine refuses or never publishes."""
    if name.startswith(".wh."):
        raise StandinError(f"refusing to publish overlay whiteout {rel!r}: whiteouts are never published")
    if rel == ".cvmfs":
        raise StandinError("refusing to publish top-level '.cvmfs': it is the reserved virtual directory")
    if name == ".cvmfscatalog" and not stat.S_ISREG(st.st_mode):
        raise StandinError(f"refusing to publish {rel!r}: a .cvmfscatalog must be a regular file")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise StandinError(f"refusing to publish special file {rel!r} (device, fifo or socket)")


def refuse_symlink_components(union: str, rel: str, include_last: bool, what: str) -> None:
    """Writing or deleting below a symbolic link would touch files outside the repository."""
    parts = rel.split("/") if rel else []
    path = union
    for part in parts if include_last else parts[:-1]:
        path = os.path.join(path, part)
        if os.path.islink(path):
            raise StandinError(f"{what} /{rel} passes through the symbolic link /{os.path.relpath(path, union)}")
        if not os.path.exists(path):
            return


def scan(union: str, scope: str, hasher: Hasher, gateway: Gateway) -> dict:
    """Manifest entries of the union dir inside `scope`, storing new file contents in the gateway."""
    entries: dict = {}

    def visit(rel: str, path: str, st: os.stat_result) -> None:
        check_publishable(rel, os.path.basename(rel), st)
        if stat.S_ISDIR(st.st_mode):
            entries[rel] = {"type": "dir"}
            walk(rel, path)
        elif stat.S_ISLNK(st.st_mode):
            entries[rel] = {"type": "symlink", "target": os.readlink(path)}
        else:
            sha256 = hasher.sha256(rel, path, st, gateway)
            entries[rel] = {"type": "file", "sha256": sha256, "size": st.st_size, "mode": stat.S_IMODE(st.st_mode)}

    def walk(rel: str, path: str) -> None:
        with os.scandir(path) as listing:
            children = sorted(listing, key=lambda entry: entry.name)
        for child in children:
            visit(join_rel(rel, child.name), child.path, child.stat(follow_symlinks=False))

    start = os.path.join(union, scope) if scope else union
    if not scope:
        walk("", union)
    elif os.path.lexists(start):
        visit(scope, start, os.lstat(start))
    return entries


def kind_of(st: os.stat_result) -> str:
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    return "file" if stat.S_ISREG(st.st_mode) else "special"


def remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def restore(union: str, manifest: dict, gateway: Gateway, hasher: Hasher) -> list:
    """Make the union dir exactly `manifest`, touching only what differs. Returns the paths it changed."""
    changed: list = []
    present: set = set()

    def put_file(rel: str, path: str, entry: dict) -> None:
        if os.path.lexists(path):
            os.unlink(path)
        shutil.copyfile(gateway.blob(entry["sha256"]), path)
        os.chmod(path, entry["mode"])
        # Written by us from the store: its content is known, whatever the clock granularity.
        hasher.remember(rel, os.lstat(path), entry["sha256"], trusted=True)

    def walk(rel_dir: str, path_dir: str) -> None:
        with os.scandir(path_dir) as listing:
            children = sorted(listing, key=lambda entry: entry.name)
        for child in children:
            rel = join_rel(rel_dir, child.name)
            st = child.stat(follow_symlinks=False)
            wanted = manifest.get(rel)
            if wanted is None or wanted["type"] != kind_of(st):
                remove_path(child.path)
                changed.append(rel)
                continue
            present.add(rel)
            if wanted["type"] == "dir":
                walk(rel, child.path)
            elif wanted["type"] == "symlink":
                if os.readlink(child.path) != wanted["target"]:
                    os.unlink(child.path)
                    os.symlink(wanted["target"], child.path)
                    changed.append(rel)
            elif hasher.sha256(rel, child.path, st) != wanted["sha256"]:
                put_file(rel, child.path, wanted)
                changed.append(rel)
            elif stat.S_IMODE(st.st_mode) != wanted["mode"]:
                os.chmod(child.path, wanted["mode"])
                changed.append(rel)

    os.makedirs(union, exist_ok=True)
    walk("", union)
    for rel in sorted(manifest):  # parents sort before their children
        if rel in present:
            continue
        entry, path = manifest[rel], os.path.join(union, rel)
        if entry["type"] == "dir":
            os.mkdir(path)
        elif entry["type"] == "symlink":
            os.symlink(entry["target"], path)
        else:
            put_file(rel, path, entry)
        changed.append(rel)
    hasher.forget_outside(manifest)
    return changed


# ---------------------------------------------------------------------------------------------------------------
# Repository operations (callers hold the gateway lock)


def open_repository(root: str, fqrn_and_path: str) -> tuple[Local, str]:
    """'<fqrn>[/<subpath>]' -> (the local repository, normalized subpath); exit 1 when it does not exist."""
    fqrn, _, subpath = fqrn_and_path.partition("/")
    local = Local(root, fqrn)
    if not FQRN_PATTERN.match(fqrn) or not local.exists():
        raise StandinError(f"Repository {fqrn} not found (no {local.config_dir})")
    return local, normalize_repo_path(subpath, "lease path")


def sync_union(local: Local, gateway: Gateway, reason: str | None = None) -> list:
    """Bring the union dir to the newest published revision (another publisher may have published)."""
    hasher = Hasher(local.load_stat_cache())
    changed = restore(local.union, gateway.manifest(), gateway, hasher)
    local.save_stat_cache(hasher.cache)
    settings = local.settings()
    settings["local_revision"] = gateway.current()
    local.save_settings(settings)
    if changed and reason:
        print(f"{PROG}: {reason}: {len(changed)} path(s) put back, e.g. {changed[0]!r}", file=sys.stderr)
    return changed


def drop_own_leases(local: Local, gateway: Gateway) -> None:
    leases = gateway.leases()
    kept = [lease for lease in leases if lease["owner"] != local.spool]
    if len(kept) != len(leases):
        gateway.save_leases(kept)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(local.session_token)


def open_transaction(local: Local, lease_path: str) -> None:
    gateway = local.gateway()
    if local.in_transaction():
        raise StandinError(f"another transaction is already open on {local.fqrn}", EXIT_EEXIST)
    if local.settings().get("local_revision") == gateway.current():
        sync_union(local, gateway, reason="discarded changes made to the union dir outside a transaction "
                                          "(the real union mount is read-only then)")
    else:
        sync_union(local, gateway)
    if lease_path:
        check_lease_parent(local, gateway.manifest(), lease_path)
    for lease in gateway.leases():
        if lease["owner"] != local.spool and paths_overlap(lease["path"], lease_path):
            raise StandinError(
                f"the gateway lease on {local.fqrn}/{lease_path} is busy: publisher {lease['publisher']} holds "
                f"{local.fqrn}/{lease['path']} (path_busy)", EXIT_EBUSY)
    token = os.urandom(16).hex()
    leases = [lease for lease in gateway.leases() if lease["owner"] != local.spool]
    leases.append({"token": token, "path": lease_path, "owner": local.spool, "publisher": local.publisher(),
                   "since": time.time()})
    gateway.save_leases(leases)
    write_text_atomic(local.session_token, token + "\n")
    write_text_atomic(local.transaction_lock, f"{local.fqrn}/{lease_path}\n")


def check_lease_parent(local: Local, manifest: dict, lease_path: str) -> None:
    """The real tool disallows transactions on paths whose parent does not exist (repository_transaction.cc)."""
    parent = lease_path.rpartition("/")[0]
    if parent == "":
        return
    entry = manifest.get(parent)
    if entry is None:
        raise StandinError(f"cannot open a transaction on {local.fqrn}/{lease_path}: "
                           f"parent directory /{parent} does not exist", EXIT_ENOENT)
    if entry["type"] != "dir":
        raise StandinError(f"cannot open a transaction on {local.fqrn}/{lease_path}: "
                           f"/{parent} is not a directory", EXIT_ENOTDIR)


def own_lease(local: Local, gateway: Gateway) -> dict:
    for lease in gateway.leases():
        if lease["owner"] == local.spool:
            return lease
    raise StandinError(f"the gateway lease of the transaction on {local.fqrn} is gone; abort the transaction")


def publish_transaction(local: Local, log_fields: dict) -> int:
    """Scan the lease path of the union dir into a new revision, close the transaction. Returns the revision."""
    gateway = local.gateway()
    if not local.in_transaction():
        raise StandinError(f"Repository {local.fqrn} is not in a transaction")
    lease = own_lease(local, gateway)
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
    drop_own_leases(local, gateway)
    os.unlink(local.transaction_lock)
    # Changes outside the lease were not merged: the union dir shows what was published, as after a remount.
    restore(local.union, manifest, gateway, hasher)
    local.save_stat_cache(hasher.cache)
    settings = local.settings()
    settings["local_revision"] = revision
    local.save_settings(settings)
    return revision


def abort_transaction(local: Local) -> None:
    gateway = local.gateway()
    drop_own_leases(local, gateway)
    if not local.in_transaction():
        raise StandinError(f"Repository {local.fqrn} is not in a transaction", EXIT_EINVAL)
    sync_union(local, gateway)
    os.unlink(local.transaction_lock)


# ---------------------------------------------------------------------------------------------------------------
# Commands


def confirm(question: str) -> bool:
    print(f"{question} (y/N)? ", end="", flush=True)
    answer = sys.stdin.readline().strip()
    return answer in ("y", "Y")


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
                           "fields <type>,<tmp dir>,<config>, e.g. gw,/srv/cvmfs/<fqrn>/data/txn,http://gw:4929/api/v1")
    if upstream[0] != "gw":
        raise StandinError(f"-u {args.upstream!r}: the stand-in only makes gateway publishers (upstream type 'gw')")
    import_keys(local, args.keys)
    gateway = Gateway(default_gateway_dir(local.root), fqrn)
    publisher = os.environ.get("CVMFS_STANDIN_PUBLISHER") or os.uname().nodename
    with gateway.locked():
        if local.exists():  # again, under the lock: a concurrent mkfs may have won
            raise StandinError(f"The repository {fqrn} already exists")
        if not gateway.exists():
            gateway.create()
        for sub in ("scratch/current", "scratch/wastebin", "rdonly", "tmp", "cache", "ofs_workdir"):
            os.makedirs(os.path.join(local.spool, sub), exist_ok=True)
        local.save_settings({"gateway_dir": gateway.base, "publisher": publisher})
        gateway.register(local, publisher)
        sync_union(local, gateway)
        write_config(local, args, publisher)  # last: the config dir is what says "the repository exists"
    print(f"Created repository {fqrn} ({PROG}, gateway publisher {publisher}, revision {gateway.current()})")
    return 0


def import_keys(local: Local, import_dir: str | None) -> None:
    """import_keychain of cvmfs_server_mkfs.sh: copy the three gateway-publisher keys unless already present."""
    source_dir = os.path.abspath(import_dir) if import_dir else local.keys_dir
    names = [local.fqrn + suffix for suffix in GATEWAY_KEY_SUFFIXES]
    for name in names:
        if not os.path.isfile(os.path.join(source_dir, name)):
            raise StandinError(f"key file {os.path.join(source_dir, name)} is missing: a gateway publisher needs "
                               f"{', '.join(names)}")
    if os.path.realpath(source_dir) == os.path.realpath(local.keys_dir):
        return
    for name in names:
        target = os.path.join(local.keys_dir, name)
        if os.path.isfile(target) and not same_content(target, os.path.join(source_dir, name)):
            raise StandinError(f"Importing keys from {source_dir} would overwrite keys in {local.keys_dir}")
    os.makedirs(local.keys_dir, exist_ok=True)
    for name in names:
        target = os.path.join(local.keys_dir, name)
        if not os.path.isfile(target):
            shutil.copyfile(os.path.join(source_dir, name), target)
        os.chmod(target, 0o400 if name.endswith(".gw") else 0o444)


def same_content(first: str, second: str) -> bool:
    with open(first, "rb") as one, open(second, "rb") as two:
        return one.read() == two.read()


def write_config(local: Local, args, publisher: str) -> None:
    fqrn = local.fqrn
    server = {
        "CVMFS_REPOSITORY_NAME": fqrn,
        "CVMFS_REPOSITORY_TYPE": "stratum0",
        "CVMFS_USER": args.owner or os.environ.get("USER") or "root",
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
    # Written aside, then renamed into repositories.d: `list` and `exists` never see half a repository.
    staging = os.path.join(local.root, "etc", "cvmfs", f".standin-mkfs-{fqrn}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    for name, values in (("server.conf", server), ("client.conf", client)):
        with open(os.path.join(staging, name), "w", encoding="utf-8") as handle:
            handle.write(header + "".join(f"{key}={value}\n" for key, value in values.items()))
    os.makedirs(os.path.dirname(local.config_dir), exist_ok=True)
    os.replace(staging, local.config_dir)


def with_retry(timeout: float | None, attempt):
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
                print(f"{PROG}: {error}; retrying for {'ever' if not timeout else f'up to {timeout:g} s'}",
                      file=sys.stderr, flush=True)
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
    with local.gateway().locked():
        revision = publish_transaction(local, {"command": "publish", "tag": args.tag, "message": args.message})
    print(f"Changes submitted to repository gateway ({PROG}: {local.fqrn} revision {revision})")
    return 0


def cmd_abort(root: str, args) -> int:
    local, _ = open_repository(root, args.repository)
    if local.in_transaction() and not args.force:
        if not confirm(f"You are about to DISCARD ALL CHANGES OF THE CURRENT TRANSACTION for {local.fqrn}! "
                       "Are you sure"):
            raise StandinError("aborted by the user; the transaction stays open", EXIT_EINTR)
    with local.gateway().locked():
        abort_transaction(local)
    print(f"Transaction on {local.fqrn} aborted ({PROG})")
    return 0


def cmd_ingest(root: str, args) -> int:
    import tarfile  # only ingest needs it: every other command starts faster without
    import zlib

    local, _ = open_repository(root, args.repository)
    if args.tar_file is None and args.delete is None:
        raise StandinError("ingest needs -t <tar> -b <base dir> and/or -d <path>")
    if (args.tar_file is None) != (args.base_dir is None):
        raise StandinError("ingest: -t and -b go together")
    base_dir = normalize_repo_path(args.base_dir or "", "base directory")
    to_delete = None if args.delete is None else normalize_repo_path(args.delete, "path to delete")
    if to_delete == "":
        raise StandinError("ingest -d: refusing to delete the repository root")
    lease_path = base_dir if args.tar_file is not None else to_delete
    if to_delete is not None and not is_within(to_delete, lease_path):
        raise StandinError(f"ingest -d {args.delete}: the path must be inside the base directory /{base_dir}")
    gateway = local.gateway()
    with gateway.locked():
        try:
            open_transaction(local, lease_path)
        except StandinError as error:
            raise StandinError(f"ingest cannot open its transaction: {error}") from None
    try:
        refuse_symlink_components(local.union, base_dir, include_last=True, what="the base directory")
        if to_delete is not None:
            refuse_symlink_components(local.union, to_delete, include_last=False, what="the path to delete")
            target = os.path.join(local.union, to_delete)
            if os.path.lexists(target):
                remove_path(target)
        if args.tar_file is not None:
            os.makedirs(os.path.join(local.union, base_dir), exist_ok=True)
            extract_tar(args.tar_file, local.union, base_dir)
            if args.catalog:
                open(os.path.join(local.union, base_dir, ".cvmfscatalog"), "a").close()
        with gateway.locked():
            revision = publish_transaction(local, {"command": "ingest", "base_dir": base_dir, "deleted": to_delete})
    except BaseException as error:
        with gateway.locked():
            abort_transaction(local)
        if isinstance(error, StandinError):
            raise StandinError(f"ingest failed, nothing published: {error}") from None
        if isinstance(error, (tarfile.TarError, EOFError, zlib.error, OSError)):
            raise StandinError(f"ingest failed, nothing published: cannot read {args.tar_file}: {error}") from None
        raise
    print(f"Changes submitted to repository gateway ({PROG}: {local.fqrn} revision {revision})")
    return 0


def extract_tar(tar_file: str, union: str, base_dir: str) -> None:
    """Unpack a tar (any compression tarfile detects; '-' is stdin) under base_dir, refusing escaping members."""
    import tarfile

    base_path = os.path.join(union, base_dir) if base_dir else union
    stream = sys.stdin.buffer if tar_file == "-" else None
    # Stream mode reads stdin and files alike, in one pass.
    with tarfile.open(name=None if stream else tar_file, fileobj=stream, mode="r|*") as archive:
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
            else:
                raise StandinError(f"tar member {member.name!r} is a device or fifo; "
                                   "the stand-in does not ingest those")


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


def cmd_list(root: str, args) -> int:
    repositories_dir = os.path.join(os.path.abspath(root), "etc", "cvmfs", "repositories.d")
    names = sorted(os.listdir(repositories_dir)) if os.path.isdir(repositories_dir) else []
    for fqrn in names:
        local = Local(root, fqrn)
        if not os.path.isfile(os.path.join(local.config_dir, "server.conf")):
            continue
        upstream_type = read_conf(os.path.join(local.config_dir, "server.conf")).get(
            "CVMFS_UPSTREAM_STORAGE", "").split(",")[0]
        state = " - in transaction" if local.in_transaction() else ""
        print(f"{fqrn} (stratum0 / {upstream_type}{state})")
    return 0


def read_conf(path: str) -> dict:
    values = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            key, sep, value = line.strip().partition("=")
            if sep and not key.startswith("#"):
                values[key] = value
    return values


def cmd_rmfs(root: str, args) -> int:
    local, _ = open_repository(root, args.repository)
    if not args.force and not confirm(f"You are about to WIPE OUT THE CVMFS REPOSITORY {local.fqrn} "
                                      f"{'' if args.preserve_keys else 'INCLUDING SIGNING KEYS'}! Are you sure"):
        raise StandinError(f"not removing {local.fqrn}")
    gateway = local.gateway()
    with gateway.locked():
        drop_own_leases(local, gateway)
        if gateway.unregister(local):
            shutil.rmtree(gateway.dir, ignore_errors=True)
        for path in (local.config_dir, local.spool, local.union):
            shutil.rmtree(path, ignore_errors=True)
        if not args.preserve_keys:
            for suffix in ALL_KEY_SUFFIXES:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(local.keys_dir, local.fqrn + suffix))
    print(f"Repository {local.fqrn} removed ({PROG}{', keys kept' if args.preserve_keys else ''})")
    return 0


class Parser(argparse.ArgumentParser):
    """Usage errors exit 1 like the real tool's `die` (argparse's 2 would read as ENOENT)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_FAIL, f"{PROG}: {message}\n")


def accept_ignored(parser: argparse.ArgumentParser, flags: tuple, options: tuple) -> None:
    """Options of the real tool that change nothing the stand-in models: accepted so that callers need no branch."""
    for flag in flags:
        parser.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    for option in options:
        parser.add_argument(option, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description=(
        f"{PROG}: reproduces the gateway-publisher commands of CernVM-FS's cvmfs_server under $CVMFS_STANDIN_ROOT "
        "for development and tests. Not the real tool: no FUSE, no OverlayFS, no gateway, no signing."))
    commands = parser.add_subparsers(dest="command", metavar="command", parser_class=Parser)
    commands.required = True

    mkfs = commands.add_parser("mkfs", help="create a gateway publisher for a repository")
    mkfs.add_argument("-w", dest="stratum0", metavar="STRATUM0_URL")
    mkfs.add_argument("-u", dest="upstream", metavar="gw,TXN_DIR,GATEWAY_URL")
    mkfs.add_argument("-k", dest="keys", metavar="KEY_DIR")
    mkfs.add_argument("-o", dest="owner")
    mkfs.add_argument("-f", dest="unionfs")
    mkfs.add_argument("-a", dest="hash_algorithm")
    mkfs.add_argument("-x", dest="proxy")
    mkfs.add_argument("-z", dest="gc", action="store_true")
    mkfs.add_argument("-g", dest="no_autotag", action="store_true")
    accept_ignored(mkfs, flags=("-m", "-v", "-p", "-X", "-R"), options=("-G", "-V", "-Z", "-s"))
    mkfs.add_argument("fqrn")
    mkfs.set_defaults(func=cmd_mkfs)

    transaction = commands.add_parser("transaction", help="open a transaction: <fqrn>[/<lease path>]")
    transaction.add_argument("-t", "--retry-timeout", type=float, metavar="SECONDS")
    transaction.add_argument("-T", "--template")
    transaction.add_argument("repository")
    transaction.set_defaults(func=cmd_transaction)

    publish = commands.add_parser("publish", help="publish the open transaction as a new revision")
    publish.add_argument("-a", dest="tag")
    publish.add_argument("-m", dest="message")
    accept_ignored(publish, flags=("-v", "-f", "-e", "-d", "-p", "-X", "-N"), options=("-n", "-Z", "-F", "-c"))
    publish.add_argument("repository")
    publish.set_defaults(func=cmd_publish)

    abort = commands.add_parser("abort", help="discard the open transaction")
    abort.add_argument("-f", dest="force", action="store_true")
    abort.add_argument("repository")
    abort.set_defaults(func=cmd_abort)

    ingest = commands.add_parser("ingest", help="unpack a tar (or '-') under a base dir as one revision")
    ingest.add_argument("-t", "--tar_file")
    ingest.add_argument("-b", "--base_dir")
    ingest.add_argument("-d", "--delete")
    ingest.add_argument("-c", "--catalog", action="store_true")
    ingest.add_argument("-k", "--keep_ownership", action="store_true", help=argparse.SUPPRESS)
    ingest.add_argument("-u", "--uid", help=argparse.SUPPRESS)
    ingest.add_argument("-g", "--gid", help=argparse.SUPPRESS)
    ingest.add_argument("repository")
    ingest.set_defaults(func=cmd_ingest)

    listing = commands.add_parser("list", help="one line per repository")
    listing.set_defaults(func=cmd_list)

    rmfs = commands.add_parser("rmfs", help="remove a repository's publisher side")
    rmfs.add_argument("-f", dest="force", action="store_true")
    rmfs.add_argument("-p", dest="preserve_keys", action="store_true")
    rmfs.add_argument("repository")
    rmfs.set_defaults(func=cmd_rmfs)
    return parser


def main(argv: list | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = os.environ.get("CVMFS_STANDIN_ROOT")
    if not root:
        print(f"{PROG}: CVMFS_STANDIN_ROOT is not set: it names the folder the stand-in maps /etc/cvmfs, "
              "/var/spool/cvmfs and /cvmfs into", file=sys.stderr)
        return EXIT_FAIL
    try:
        return args.func(root, args)
    except StandinError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:  # the real tool dies (exit 1) on I/O errors too
        print(f"{PROG}: {error}", file=sys.stderr)
        return EXIT_FAIL


# ---------------------------------------------------------------------------------------------------------------
# Read API for tests (root is $CVMFS_STANDIN_ROOT; the gateway folder is the one mkfs recorded)


def _gateway_for(root: str, fqrn: str, gateway_dir: str | None) -> Gateway:
    return Gateway(gateway_dir, fqrn) if gateway_dir else Local(root, fqrn).gateway()


def current_revision(root: str, fqrn: str, gateway_dir: str | None = None) -> int:
    return _gateway_for(root, fqrn, gateway_dir).current()


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
