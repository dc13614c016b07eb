"""The gateway side of a repository, shared by every publisher: published revisions, the content store, and leases.

A real gateway is an HTTP service (gateway/internal/gateway/backend/lease_service.go); here it is a folder
(``$CVMFS_STANDIN_GATEWAY_DIR``, default ``$ROOT/srv/cvmfs-standin/gateway``) shared through the file system, with
one lock file per repository serialising every change. Leases expire after ``$CVMFS_STANDIN_LEASE_SECONDS``
(default 7200, the gateway's ``max_lease_time``); an expired lease neither blocks anyone nor can commit.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time

from .common import StandinError, paths_overlap, write_json_atomic, write_text_atomic

DEFAULT_LEASE_SECONDS = 7200


def default_gateway_dir(root: str) -> str:
    return os.path.abspath(
        os.environ.get("CVMFS_STANDIN_GATEWAY_DIR") or os.path.join(root, "srv", "cvmfs-standin", "gateway")
    )


def lease_seconds() -> float:
    return float(os.environ.get("CVMFS_STANDIN_LEASE_SECONDS") or DEFAULT_LEASE_SECONDS)


class Gateway:
    """Published revisions, content store, leases of one repository, and the lock for all of it."""

    def __init__(self, gateway_dir: str, fqrn: str):
        self.base = os.path.abspath(gateway_dir)
        self.fqrn = fqrn
        self.dir = os.path.join(self.base, fqrn)
        self.data = os.path.join(self.dir, "data")
        self.revisions = os.path.join(self.dir, "revisions")
        self.current_file = os.path.join(self.dir, "current")
        self.log_file = os.path.join(self.dir, "publish.log")
        # Outside the repository folder too: rmfs of the last publisher does not release a lease.
        self.leases_file = os.path.join(self.base, ".leases", fqrn + ".json")
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

    # -- revisions and content -----------------------------------------------------------------------------------
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

    # -- leases: [{"token", "path", "owner" (spool path), "publisher", "since", "expires"}] ------------------------
    def leases(self) -> list:
        """The leases that have not expired."""
        try:
            with open(self.leases_file, encoding="utf-8") as handle:
                leases = json.load(handle)
        except FileNotFoundError:
            return []
        now = time.time()
        return [lease for lease in leases if lease.get("expires", float("inf")) > now]

    def save_leases(self, leases: list) -> None:
        write_json_atomic(self.leases_file, leases)

    def lease(self, token: str) -> dict | None:
        return next((lease for lease in self.leases() if lease["token"] == token), None)

    def acquire(self, path: str, owner: str, publisher: str) -> str:
        """A new lease on ``path``, or StandinError 16 when any live lease overlaps it (whoever holds it)."""
        leases = self.leases()
        for lease in leases:
            if paths_overlap(lease["path"], path):
                remaining = max(0, int(lease["expires"] - time.time()))
                raise StandinError(
                    f"CernVM-FS transaction error: the gateway lease on {self.fqrn}/{path} is busy: publisher "
                    f"{lease['publisher']} holds {self.fqrn}/{lease['path']} (path_busy, time remaining "
                    f"{remaining} s)", 16)
        token = os.urandom(16).hex()
        now = time.time()
        leases.append({"token": token, "path": path, "owner": owner, "publisher": publisher, "since": now,
                       "expires": now + lease_seconds()})
        self.save_leases(leases)
        return token

    def release(self, token: str) -> None:
        leases = self.leases()
        kept = [lease for lease in leases if lease["token"] != token]
        if len(kept) != len(leases):
            self.save_leases(kept)

    # -- publishers sharing this gateway -------------------------------------------------------------------------
    def register(self, spool: str, publisher: str) -> None:
        os.makedirs(self.publishers_dir, exist_ok=True)
        write_json_atomic(self.publisher_file(spool), {"publisher": publisher, "spool": spool})

    def unregister(self, spool: str) -> bool:
        """Forget a publisher; True when no publisher is left (the published data can go)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.publisher_file(spool))
        return not os.path.isdir(self.publishers_dir) or not os.listdir(self.publishers_dir)

    def publisher_file(self, spool: str) -> str:
        return os.path.join(self.publishers_dir, hashlib.sha256(spool.encode()).hexdigest()[:16] + ".json")
