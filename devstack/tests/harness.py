"""What the stand-in's tests share: a publisher machine (one stand-in root) driving the script as a subprocess,
and builders for keys and tar archives. The fixtures are in conftest.py."""

import io
import os
import pwd
import stat
import subprocess
import sys
import tarfile

DEVSTACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(DEVSTACK, "cvmfs_server")
# The test's own interpreter: a `python3` found on PATH may be a slow shim (pyenv). The shebang is tested once.
COMMAND = [sys.executable, SCRIPT]
if DEVSTACK not in sys.path:
    sys.path.insert(0, DEVSTACK)

import standin  # noqa: E402

FQRN = "repo.example.org"
OWNER = pwd.getpwuid(os.getuid()).pw_name  # mkfs -o: the user must exist


class Publisher:
    """One stand-in root (one publisher machine), optionally sharing a gateway folder with others."""

    def __init__(self, root, name="pub", gateway_dir=None, **env):
        self.root = str(root)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("CVMFS_STANDIN_") and k != "CVMFS_FORCE_REMOUNT_WARNING"}
        self.env.update(CVMFS_STANDIN_ROOT=self.root, CVMFS_STANDIN_PUBLISHER=name, **env)
        if gateway_dir:
            self.env["CVMFS_STANDIN_GATEWAY_DIR"] = str(gateway_dir)
        self.union = os.path.join(self.root, "cvmfs", FQRN)
        self.spool = os.path.join(self.root, "var", "spool", "cvmfs", FQRN)
        self.keys = os.path.join(self.root, "etc", "cvmfs", "keys")
        self.config = os.path.join(self.root, "etc", "cvmfs", "repositories.d", FQRN)
        self.token = os.path.join(self.spool, "session_token")
        self.lock = os.path.join(self.spool, "in_transaction.lock")

    def run(self, *args, stdin=None, cwd=None):
        return subprocess.run([*COMMAND, *args], env=self.env, input=stdin if stdin is not None else b"",
                              capture_output=True, timeout=120, cwd=cwd)

    def start(self, *args):
        return subprocess.Popen([*COMMAND, *args], env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)

    def ok(self, *args, stdin=None, cwd=None):
        result = self.run(*args, stdin=stdin, cwd=cwd)
        assert result.returncode == 0, (result.stdout.decode(), result.stderr.decode())
        return result.stdout.decode()

    def fails(self, code, *args, stdin=None, cwd=None):
        """Asserts the exit code; returns stdout + stderr (the real scripts print some failures on stdout)."""
        result = self.run(*args, stdin=stdin, cwd=cwd)
        assert result.returncode == code, (result.returncode, result.stdout.decode(), result.stderr.decode())
        return result.stdout.decode() + result.stderr.decode()

    def mkfs(self, fqrn=FQRN, key_dir=None, upstream="gw,/srv/cvmfs/txn,http://127.0.0.1:4929/api/v1", owner=OWNER):
        key_dir = key_dir or make_keys(os.path.join(self.root + "-import-keys"), fqrn)
        return self.run("mkfs", "-w", f"http://127.0.0.1/cvmfs/{fqrn}", "-u", upstream, "-k", str(key_dir),
                        "-o", owner, fqrn)

    def write(self, rel, data=b"x"):
        path = os.path.join(self.union, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)

    def tree(self, rev=None):
        return standin.published_tree(self.root, FQRN, rev)

    def revision(self):
        return standin.current_revision(self.root, FQRN)

    def mounted_revision(self):
        return standin.mounted_revision(self.root, FQRN)

    def read(self, rel, rev=None):
        return standin.read_published_file(self.root, FQRN, rel, rev)

    def in_transaction(self):
        return standin.in_transaction(self.root, FQRN)

    def log(self):
        return standin.publish_log(self.root, FQRN)

    def leases(self):
        return standin.Local(self.root, FQRN).gateway().leases()

    def publish_files(self, files):
        self.ok("transaction", FQRN)
        for rel, data in files.items():
            self.write(rel, data)
        self.ok("publish", FQRN)


def make_keys(directory, fqrn=FQRN, content="key"):
    os.makedirs(directory, exist_ok=True)
    for suffix in (".crt", ".pub", ".gw"):
        with open(os.path.join(directory, fqrn + suffix), "w") as handle:
            handle.write(f"{content}{suffix}\n")
    return str(directory)


def snapshot(directory):
    """Everything a client could see: type, content, mode, link target, for every path below `directory`."""
    result = {}
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, directory)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                result[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                result[rel] = ("dir",)
            else:
                with open(path, "rb") as handle:
                    result[rel] = ("file", handle.read(), stat.S_IMODE(st.st_mode))
    return result


def tar_bytes(members, compress=False):
    """members: {name: bytes | ('dir',) | ('symlink', target) | ('hardlink', target)}."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if compress else "w") as archive:
        for name, spec in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(spec, bytes):
                info.size, info.mode = len(spec), 0o644
                archive.addfile(info, io.BytesIO(spec))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}[spec[0]]
            info.mode = 0o755
            if spec[0] != "dir":
                info.linkname = spec[1]
            archive.addfile(info)
    return buffer.getvalue()
