"""A fresh repository (stand-in) and its bucket for the cvmfs_sync integration tests, and archive builders."""
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from helpers import run_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "devstack"))
import standin  # noqa: E402  (the stand-in's read API: published revisions)

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _sync  # noqa: E402
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.modules import cvmfs_sync  # noqa: E402

MODULE = "infn_cloud.cvmfs_publisher.cvmfs_sync"


def sha(data):
    return hashlib.sha256(data).hexdigest()


def tgz(members, mode="w:gz"):
    """A gzipped tar (or another ``mode``: "w" is a plain tar) of {name: bytes | ('symlink', target) | ('dir',)}."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, tuple) and content[0] == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, content[1]
                archive.addfile(info)
            elif isinstance(content, tuple):
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
    return buf.getvalue()


class Repo:
    """One fresh repository (stand-in) and its bucket."""

    def __init__(self, stack, s3, short, tmp_path, owner="root"):
        self.stack, self.s3, self.short = stack, s3, short
        self.fqrn = "%s.infn.it" % short
        self.root = stack["CVMFS_STANDIN_ROOT"]
        self.bin = stack["CVMFS_SERVER_BIN"]
        keys = tmp_path / "keys"
        keys.mkdir()
        for suffix in ("crt", "pub", "gw"):
            (keys / ("%s.%s" % (self.fqrn, suffix))).write_text("stand-in key\n")
        self.cvmfs("mkfs", "-w", "%s/%s" % (stack["CVMFS_STRATUM0_URL"], self.fqrn),
                   "-u", "gw,/srv/cvmfs/%s/data/txn,%s" % (self.fqrn, stack["CVMFS_GATEWAY_URL"]),
                   "-k", str(keys), "-o", owner, self.fqrn)
        s3.create_bucket(Bucket=short)
        self.state_file = Path(self.root) / "var/lib/cvmfs-publisher/state" / (self.fqrn + ".json")

    def cvmfs(self, *args, check=True):
        return subprocess.run([self.bin, *args], capture_output=True, text=True, check=check)

    def put(self, key, data):
        self.s3.put_object(Bucket=self.short, Key=key, Body=data)

    def put_many(self, objects):
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda item: self.put(*item), objects.items()))

    def delete(self, key):
        self.s3.delete_object(Bucket=self.short, Key=key)

    def args(self, **extra):
        args = {
            "repository": self.fqrn,
            "endpoint_url": "{{ cvmfs_publisher_rgw_endpoint }}",
            "access_key_file": "{{ cvmfs_publisher_rgw_access_key_file }}",
            "secret_key_file": "{{ cvmfs_publisher_rgw_secret_key_file }}",
            "cvmfs_server_bin": "{{ cvmfs_publisher_cvmfs_server_bin }}",
            "cvmfs_root": "{{ cvmfs_publisher_cvmfs_root }}",
            "ca_bundle": "{{ cvmfs_publisher_rgw_ca_bundle or omit }}",
        }
        args.update(extra)
        return args

    def sync(self, check=False, diff=False, ansible=False, **extra):
        """One sync: through ansible-playbook (the operator's view: check mode, diff, failures) or, where only
        the engine's behaviour matters, by calling it directly (ansible's start-up costs seconds)."""
        if not (ansible or diff):
            return _sync.run(self.params(**extra), check_mode=check)
        rc, result = run_module(MODULE, self.args(**extra), check=check, diff=diff)
        assert rc == 0 and not result.get("failed"), json.dumps(result, indent=1)[-4000:]
        return result

    def params(self, **extra):
        """Module parameters for direct calls to _sync.run (fault injection)."""
        params = {name: spec.get("default") for name, spec in cvmfs_sync.ARGUMENT_SPEC.items()}
        params.update(repository=self.fqrn, endpoint_url=self.stack["RGW_ENDPOINT"], region="default",
                      access_key_file=self.stack["RGW_ACCESS_KEY_FILE"],
                      secret_key_file=self.stack["RGW_SECRET_KEY_FILE"], cvmfs_server_bin=self.bin,
                      cvmfs_root=self.root, ca_bundle=self.stack.get("CA_CERT_FILE") or None)
        params.update(extra)
        return params

    def tree(self, rev=None):
        return standin.published_tree(self.root, self.fqrn, rev)

    def files(self):
        """{path: sha256} of the published regular files."""
        return {p: v for p, v in self.tree().items() if v != "dir" and not v.startswith("link:")}

    def revision(self):
        return standin.current_revision(self.root, self.fqrn)

    def in_transaction(self):
        return standin.in_transaction(self.root, self.fqrn)
