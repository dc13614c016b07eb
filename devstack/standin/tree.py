"""Trees: scanning the union dir into a manifest (what ``publish`` records), and putting a manifest back into the
union dir (what ``abort`` and a remount do), touching only what differs.

A per-spool stat cache (size, mtime, ctime, inode) avoids re-hashing unchanged files, so publishing costs in
proportion to what changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import time

from .common import StandinError, join_rel
from .gateway import Gateway

# A file changed within this window before a scan may keep the same (size, mtime, ctime) after a later write
# (coarse file-system clocks), so its hash is not cached across runs ("racily clean", as git calls it).
# Tests set CVMFS_STANDIN_RACY_WINDOW_MS=0 to observe the cache deterministically.
RACY_WINDOW_NS = int(os.environ.get("CVMFS_STANDIN_RACY_WINDOW_MS", "1000")) * 1_000_000


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
            entries[rel] = {"type": "file", "sha256": sha256, "size": st.st_size, "mode": stat.S_IMODE(st.st_mode),
                            "uid": st.st_uid}

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
        if "uid" in entry and os.getuid() == 0:
            os.chown(path, entry["uid"], -1)
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


