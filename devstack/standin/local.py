"""One publisher's side of a repository: config, keys, spool and union dir, all below ``$CVMFS_STANDIN_ROOT``."""

from __future__ import annotations

import json
import os

from .common import FQRN_PATTERN, StandinError, normalize_repo_path, read_conf, write_json_atomic
from .gateway import Gateway, default_gateway_dir

REVISION_XATTR = "user.revision"  # what `attr -qg revision /var/spool/cvmfs/<fqrn>/rdonly` reads


class Local:
    def __init__(self, root: str, fqrn: str):
        self.root = os.path.abspath(root)
        self.fqrn = fqrn
        self.config_dir = os.path.join(self.root, "etc", "cvmfs", "repositories.d", fqrn)
        self.server_conf = os.path.join(self.config_dir, "server.conf")
        self.keys_dir = os.path.join(self.root, "etc", "cvmfs", "keys")
        self.spool = os.path.join(self.root, "var", "spool", "cvmfs", fqrn)
        self.rdonly = os.path.join(self.spool, "rdonly")
        self.union = os.path.join(self.root, "cvmfs", fqrn)
        self.transaction_lock = os.path.join(self.spool, "in_transaction.lock")
        self.session_token = os.path.join(self.spool, "session_token")
        self.stat_cache_file = os.path.join(self.spool, "standin-statcache.json")
        self.settings_file = os.path.join(self.spool, "standin.json")

    def exists(self) -> bool:
        """The repository *directory* exists (check_repository_existence): even a half-created one counts."""
        return os.path.isdir(self.config_dir)

    def in_transaction(self) -> bool:
        return os.path.isfile(self.transaction_lock)

    def config(self) -> dict:
        try:
            return read_conf(self.server_conf)
        except FileNotFoundError:
            return {}

    def owner(self) -> str:
        return self.config().get("CVMFS_USER", "")

    def settings(self) -> dict:
        """What mkfs recorded (gateway folder, publisher name) plus the revision the union dir shows."""
        try:
            with open(self.settings_file, encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return {}

    def save_settings(self, settings: dict) -> None:
        write_json_atomic(self.settings_file, settings)

    def gateway(self) -> Gateway:
        gateway_dir = self.settings().get("gateway_dir") or default_gateway_dir(self.root)
        return Gateway(gateway_dir, self.fqrn)

    def publisher(self) -> str:
        return self.settings().get("publisher") or os.uname().nodename

    def read_token(self) -> str | None:
        try:
            with open(self.session_token, encoding="utf-8") as handle:
                return handle.read().strip() or None
        except FileNotFoundError:
            return None

    def load_stat_cache(self) -> dict:
        try:
            with open(self.stat_cache_file, encoding="utf-8") as handle:
                return json.load(handle)
        except (FileNotFoundError, ValueError):
            return {}

    def save_stat_cache(self, cache: dict) -> None:
        write_json_atomic(self.stat_cache_file, cache)

    def set_mounted_revision(self, revision: int) -> None:
        """The revision the rdonly mount shows, where the real tool and the modules read it."""
        settings = self.settings()
        settings["local_revision"] = revision
        self.save_settings(settings)
        os.makedirs(self.rdonly, exist_ok=True)
        try:
            os.setxattr(self.rdonly, REVISION_XATTR, str(revision).encode())
        except OSError as error:
            raise StandinError(f"cannot set the {REVISION_XATTR} attribute of {self.rdonly} ({error.strerror}): "
                               "the stand-in needs a file system with user extended attributes") from None


def open_repository(root: str, fqrn_and_path: str) -> tuple[Local, str]:
    """'<fqrn>[/<subpath>]' -> (the local repository, normalized subpath); exit 1 when it does not exist."""
    fqrn, _, subpath = fqrn_and_path.partition("/")
    local = Local(root, fqrn)
    if not FQRN_PATTERN.match(fqrn) or not local.exists():
        raise StandinError(f"Repository {fqrn} not found (no {local.config_dir})")
    return local, normalize_repo_path(subpath, "lease path")


def require_complete(local: Local) -> None:
    """A half-created repository (mkfs died after writing its config) cannot open transactions."""
    if not os.path.isfile(local.server_conf):
        raise StandinError(f"repository {local.fqrn} is half-created: {local.server_conf} is missing")
    if not os.path.isdir(local.spool) or not os.path.isdir(local.union):
        raise StandinError(f"repository {local.fqrn} is half-created: its spool {local.spool} or union dir "
                           f"{local.union} is missing (not mounted)")
