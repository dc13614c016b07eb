"""Tests of the cvmfs_server stand-in: the script runs as a subprocess under a fresh CVMFS_STANDIN_ROOT."""

import gzip
import io
import os
import py_compile
import stat
import subprocess
import sys
import tarfile

import pytest

DEVSTACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(DEVSTACK, "cvmfs_server")
# The test's own interpreter: a `python3` found on PATH may be a slow shim (pyenv). The shebang is tested once below.
COMMAND = [sys.executable, SCRIPT]
sys.path.insert(0, DEVSTACK)

import standin  # noqa: E402

FQRN = "repo.example.org"


class Publisher:
    """One stand-in root (one publisher machine), optionally sharing a gateway folder with others."""

    def __init__(self, root, name="pub", gateway_dir=None):
        self.root = str(root)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CVMFS_STANDIN_")}
        self.env.update(CVMFS_STANDIN_ROOT=self.root, CVMFS_STANDIN_PUBLISHER=name)
        if gateway_dir:
            self.env["CVMFS_STANDIN_GATEWAY_DIR"] = str(gateway_dir)
        self.union = os.path.join(self.root, "cvmfs", FQRN)
        self.spool = os.path.join(self.root, "var", "spool", "cvmfs", FQRN)
        self.keys = os.path.join(self.root, "etc", "cvmfs", "keys")

    def run(self, *args, stdin=None):
        return subprocess.run([*COMMAND, *args], env=self.env, input=stdin, capture_output=True, timeout=60)

    def start(self, *args):
        return subprocess.Popen([*COMMAND, *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def ok(self, *args, stdin=None):
        result = self.run(*args, stdin=stdin)
        assert result.returncode == 0, result.stderr.decode()
        return result.stdout.decode()

    def fails(self, code, *args, stdin=None):
        result = self.run(*args, stdin=stdin)
        assert result.returncode == code, (result.stdout.decode(), result.stderr.decode())
        return result.stderr.decode()

    def mkfs(self, fqrn=FQRN, key_dir=None, upstream="gw,/srv/cvmfs/txn,http://127.0.0.1:4929/api/v1"):
        key_dir = key_dir or make_keys(os.path.join(self.root, "import-keys"), fqrn)
        return self.run("mkfs", "-w", f"http://127.0.0.1/cvmfs/{fqrn}", "-u", upstream, "-k", key_dir,
                        "-o", "cvmfs", fqrn)

    def write(self, rel, data=b"x"):
        path = os.path.join(self.union, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)

    def tree(self, rev=None):
        return standin.published_tree(self.root, FQRN, rev)

    def revision(self):
        return standin.current_revision(self.root, FQRN)

    def read(self, rel, rev=None):
        return standin.read_published_file(self.root, FQRN, rel, rev)

    def in_transaction(self):
        return standin.in_transaction(self.root, FQRN)

    def log(self):
        return standin.publish_log(self.root, FQRN)

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
    return directory


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


@pytest.fixture(scope="module", autouse=True)
def compiled_standin():
    """Each command is a new interpreter: with PYTHONDONTWRITEBYTECODE set it would compile standin.py every time."""
    py_compile.compile(standin.__file__)


@pytest.fixture
def pub(tmp_path):
    publisher = Publisher(tmp_path / "root")
    result = publisher.mkfs()
    assert result.returncode == 0, result.stderr.decode()
    return publisher


# --- mkfs ---------------------------------------------------------------------------------------------------------

def test_mkfs_creates_config_keys_spool_union_and_revision_0(pub):
    config = os.path.join(pub.root, "etc", "cvmfs", "repositories.d", FQRN)
    server = standin.read_conf(os.path.join(config, "server.conf"))
    assert server["CVMFS_REPOSITORY_NAME"] == FQRN
    assert server["CVMFS_REPOSITORY_TYPE"] == "stratum0"
    assert server["CVMFS_USER"] == "cvmfs"
    assert server["CVMFS_UNION_DIR"] == f"/cvmfs/{FQRN}"
    assert server["CVMFS_SPOOL_DIR"] == f"/var/spool/cvmfs/{FQRN}"
    assert server["CVMFS_STRATUM0"] == f"http://127.0.0.1/cvmfs/{FQRN}"
    assert server["CVMFS_UPSTREAM_STORAGE"] == "gw,/srv/cvmfs/txn,http://127.0.0.1:4929/api/v1"
    assert server["CVMFS_HASH_ALGORITHM"] == "sha1"
    client = standin.read_conf(os.path.join(config, "client.conf"))
    assert client["CVMFS_PUBLIC_KEY"] == f"/etc/cvmfs/keys/{FQRN}.pub"
    modes = {s: stat.S_IMODE(os.stat(os.path.join(pub.keys, FQRN + s)).st_mode) for s in (".crt", ".pub", ".gw")}
    assert modes == {".crt": 0o444, ".pub": 0o444, ".gw": 0o400}
    assert os.path.isdir(pub.union) and os.listdir(pub.union) == []
    assert os.path.isdir(pub.spool) and not pub.in_transaction()
    assert pub.revision() == 0 and pub.tree() == {}
    assert pub.ok("list") == f"{FQRN} (stratum0 / gw)\n"


def test_mkfs_refuses_an_existing_repository(pub):
    result = pub.mkfs()
    assert result.returncode == 1
    assert f"The repository {FQRN} already exists" in result.stderr.decode()


@pytest.mark.parametrize("name", ["_underscore-first", ".dot-first", "a" * 61, "has/slash", "has space", ""])
def test_mkfs_refuses_invalid_names(tmp_path, name):
    publisher = Publisher(tmp_path)
    result = publisher.mkfs(fqrn=name, key_dir=make_keys(tmp_path / "keys", name.replace("/", "_") or "x"))
    assert result.returncode == 1
    assert "invalid repository name" in result.stderr.decode()


def test_mkfs_names_the_missing_key_and_creates_nothing(tmp_path):
    publisher = Publisher(tmp_path / "root")
    keys = make_keys(tmp_path / "keys")
    os.unlink(os.path.join(keys, FQRN + ".gw"))
    result = publisher.mkfs(key_dir=keys)
    assert result.returncode == 1
    assert f"{FQRN}.gw is missing" in result.stderr.decode()
    assert publisher.ok("list") == ""
    assert not os.path.exists(publisher.keys)


@pytest.mark.parametrize("upstream,message", [
    ("gw,/srv/txn", "exactly three comma-separated fields"),
    ("gw,/srv/txn,http://gw/api/v1,extra", "exactly three comma-separated fields"),
    ("local,/srv/txn,/srv/data", "upstream type 'gw'"),
])
def test_mkfs_refuses_a_bad_upstream(tmp_path, upstream, message):
    publisher = Publisher(tmp_path)
    result = publisher.mkfs(upstream=upstream)
    assert result.returncode == 1
    assert message in result.stderr.decode()
    assert publisher.ok("list") == ""


def test_mkfs_does_not_overwrite_different_keys_but_accepts_the_same(tmp_path):
    publisher = Publisher(tmp_path / "root")
    make_keys(publisher.keys, content="installed")
    result = publisher.mkfs(key_dir=make_keys(tmp_path / "other", content="different"))
    assert result.returncode == 1
    assert "would overwrite keys in" in result.stderr.decode()
    assert publisher.mkfs(key_dir=make_keys(tmp_path / "same", content="installed")).returncode == 0


def test_missing_root_variable_and_help_name_the_stand_in(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CVMFS_STANDIN_ROOT"}
    result = subprocess.run([SCRIPT, "list"], env=env, capture_output=True)
    assert result.returncode == 1 and b"CVMFS_STANDIN_ROOT is not set" in result.stderr
    result = subprocess.run([SCRIPT, "--help"], env=env, capture_output=True)
    assert result.returncode == 0 and b"cvmfs_server (stand-in)" in result.stdout


# --- transaction, publish, abort ----------------------------------------------------------------------------------

def test_publish_makes_numbered_revisions_with_content(pub):
    pub.ok("transaction", FQRN)
    assert pub.in_transaction()
    assert pub.ok("list") == f"{FQRN} (stratum0 / gw - in transaction)\n"
    pub.write("a/one.txt", b"one")
    pub.write("a/run.sh", b"#!/bin/sh\n")
    os.chmod(os.path.join(pub.union, "a/run.sh"), 0o755)
    os.symlink("one.txt", os.path.join(pub.union, "a/link"))
    assert pub.revision() == 0  # nothing visible before publish
    assert "Changes submitted to repository gateway" in pub.ok("publish", FQRN)
    assert not pub.in_transaction()
    assert pub.revision() == 1
    tree = pub.tree()
    assert set(tree) == {"a", "a/one.txt", "a/run.sh", "a/link"}
    assert tree["a"] == "dir" and tree["a/link"] == "link:one.txt"
    assert pub.read("a/one.txt") == b"one" and pub.read("/a/run.sh") == b"#!/bin/sh\n"
    assert standin.published_manifest(pub.root, FQRN)["a/run.sh"]["mode"] == 0o755

    pub.publish_files({"a/one.txt": b"ONE!"})
    assert pub.revision() == 2
    assert pub.read("a/one.txt") == b"ONE!" and pub.read("a/one.txt", rev=1) == b"one"
    assert pub.log()[-1]["changed"] == ["a/one.txt"]


def test_abort_restores_the_published_tree_exactly(pub):
    pub.publish_files({"keep.txt": b"keep", "mod.txt": b"original", "d/inner.txt": b"inner", "gone/x": b"x"})
    os.symlink("keep.txt", os.path.join(pub.union, "l"))  # outside a transaction: discarded at the next open
    before = snapshot(pub.union)
    pub.ok("transaction", FQRN)
    assert "l" not in snapshot(pub.union)
    before.pop("l")
    pub.write("mod.txt", b"modified, longer")
    pub.write("added/new.txt", b"new")
    pub.write("d/added.txt", b"added")
    os.unlink(os.path.join(pub.union, "keep.txt"))
    os.mkdir(os.path.join(pub.union, "keep.txt"))  # a file replaced by a directory
    os.chmod(os.path.join(pub.union, "d/inner.txt"), 0o600)
    import shutil
    shutil.rmtree(os.path.join(pub.union, "gone"))
    assert "Transaction on" in pub.ok("abort", "-f", FQRN)
    assert snapshot(pub.union) == before
    assert not pub.in_transaction() and pub.revision() == 1
    assert not os.path.exists(os.path.join(pub.spool, "session_token"))


def test_abort_same_size_rewrite_is_detected(pub):
    pub.publish_files({"f": b"aaaa"})
    pub.ok("transaction", FQRN)
    pub.write("f", b"bbbb")
    pub.ok("abort", "-f", FQRN)
    with open(os.path.join(pub.union, "f"), "rb") as handle:
        assert handle.read() == b"aaaa"
    pub.publish_files({"f": b"cccc"})
    assert pub.read("f") == b"cccc"


def test_abort_without_force_asks(pub):
    pub.ok("transaction", FQRN)
    pub.write("f", b"pending")
    assert "aborted by the user" in pub.fails(4, "abort", FQRN, stdin=b"n\n")
    assert pub.in_transaction() and os.path.exists(os.path.join(pub.union, "f"))
    pub.ok("abort", FQRN, stdin=b"y\n")
    assert not pub.in_transaction() and not os.path.exists(os.path.join(pub.union, "f"))


def test_exit_codes(pub):
    for command in (["transaction"], ["publish"], ["abort", "-f"], ["rmfs", "-f"]):
        assert "not found" in pub.fails(1, *command, "missing.example.org")
    assert f"Repository {FQRN} is not in a transaction" in pub.fails(1, "publish", FQRN)
    assert f"Repository {FQRN} is not in a transaction" in pub.fails(22, "abort", "-f", FQRN)
    assert "parent directory /no does not exist" in pub.fails(2, "transaction", f"{FQRN}/no/such")
    pub.publish_files({"file": b"f"})
    assert "not a directory" in pub.fails(20, "transaction", f"{FQRN}/file/sub")
    assert not pub.in_transaction()
    pub.ok("transaction", FQRN)
    assert "already open" in pub.fails(17, "transaction", FQRN)
    assert "already open" in pub.fails(17, "transaction", "-t", "0.3", FQRN)


def test_abort_outside_a_transaction_drops_a_stale_lease(pub):
    pub.ok("transaction", f"{FQRN}/sub")
    os.unlink(os.path.join(pub.spool, "in_transaction.lock"))  # as if the machine crashed mid-transaction
    other = Publisher(pub.root + "-other", "other", gateway_dir=os.path.join(pub.root, "srv/cvmfs-standin/gateway"))
    assert other.mkfs().returncode == 0
    assert "publisher pub holds" in other.fails(16, "transaction", FQRN)
    pub.fails(22, "abort", "-f", FQRN)
    assert not os.path.exists(os.path.join(pub.spool, "session_token"))
    other.ok("transaction", FQRN)


@pytest.mark.parametrize("bad,message", [
    ("dir/.wh.deleted", "overlay whiteout"),
    (".cvmfs/snapshots", "reserved virtual directory"),
    ("dir/.cvmfscatalog/x", "must be a regular file"),
])
def test_publish_refuses_what_cvmfs_never_publishes(pub, bad, message):
    pub.ok("transaction", FQRN)
    pub.write(bad)
    assert message in pub.fails(1, "publish", FQRN)
    assert pub.in_transaction() and pub.revision() == 0
    pub.ok("abort", "-f", FQRN)
    assert os.listdir(pub.union) == []


def test_publish_hashes_only_changed_files(tmp_path):
    publisher = Publisher(tmp_path)
    publisher.env["CVMFS_STANDIN_RACY_WINDOW_MS"] = "0"  # trust the stat cache at once
    assert publisher.mkfs().returncode == 0
    publisher.publish_files({f"d{i % 5}/f{i}": b"%d" % i for i in range(200)})
    assert publisher.log()[-1]["hashed"] == 200
    publisher.publish_files({"d0/f0": b"changed, longer", "d1/f1": b"changed too", "new": b"new"})
    entry = publisher.log()[-1]
    assert entry["hashed"] == 3
    assert entry["changed"] == ["d0/f0", "d1/f1", "new"]
    assert publisher.read("d1/f1") == b"changed too" and publisher.read("d2/f2") == b"2"


def test_two_racing_processes_get_one_transaction(pub):
    for _ in range(3):
        racers = [pub.start("transaction", FQRN) for _ in range(2)]
        codes = sorted(racer.wait(timeout=60) for racer in racers)
        for racer in racers:
            racer.stdout.close()
            racer.stderr.close()
        assert codes == [0, 17]
        pub.ok("abort", "-f", FQRN)


# --- two publishers sharing one gateway ---------------------------------------------------------------------------

@pytest.fixture
def pair(tmp_path):
    gateway = tmp_path / "gateway"
    first, second = Publisher(tmp_path / "a", "pubA", gateway), Publisher(tmp_path / "b", "pubB", gateway)
    keys = make_keys(tmp_path / "keys")
    for publisher in (first, second):
        result = publisher.mkfs(key_dir=keys)
        assert result.returncode == 0, result.stderr.decode()
    return first, second


def test_leases_conflict_on_overlapping_paths_only(pair):
    first, second = pair
    first.publish_files({"a/seed": b"seed", "c/seed": b"seed"})
    first.ok("transaction", f"{FQRN}/a")
    assert "publisher pubA holds" in second.fails(16, "transaction", f"{FQRN}/a/b")
    second.fails(16, "transaction", FQRN)  # the root overlaps everything
    second.ok("transaction", f"{FQRN}/c")  # brings b's union up to revision 1 first
    second.write("c/from-b", b"b")
    second.write("a/sneaky", b"outside b's lease")
    first.write("a/from-a", b"a")
    first.ok("publish", FQRN)
    second.ok("publish", FQRN)
    assert first.revision() == second.revision() == 3
    tree = second.tree()
    assert "a/from-a" in tree and "c/from-b" in tree and "a/sneaky" not in tree
    assert not os.path.exists(os.path.join(second.union, "a/sneaky"))  # the union shows what was published
    second.ok("transaction", FQRN)
    assert second.tree() == first.tree()
    assert set(snapshot(second.union)) == set(second.tree())


def test_transaction_retry_succeeds_after_the_other_publisher_publishes(pair):
    first, second = pair
    first.ok("transaction", FQRN)
    waiting = second.start("transaction", "-t", "120", FQRN)
    assert b"retrying" in waiting.stderr.readline()  # it has met the busy lease
    first.write("from-a", b"a")
    first.ok("publish", FQRN)
    assert waiting.wait(timeout=60) == 0
    waiting.stdout.close()
    waiting.stderr.close()
    with open(os.path.join(second.union, "from-a"), "rb") as handle:
        assert handle.read() == b"a"


# --- ingest -------------------------------------------------------------------------------------------------------

def test_ingest_unpacks_and_replaces_in_one_revision(pub, tmp_path):
    pub.publish_files({"data/keep": b"keep"})
    tarball = tmp_path / "one.tar"
    tarball.write_bytes(tar_bytes({"./": ("dir",), "old.txt": b"old", "sub/a": b"a", "sub/hard": ("hardlink", "sub/a"),
                                   "sub/rel": ("symlink", "a")}))
    out = pub.ok("ingest", "-t", str(tarball), "-b", "/data/set", FQRN)
    assert "Changes submitted to repository gateway" in out
    assert pub.revision() == 2 and not pub.in_transaction()
    assert pub.read("data/set/sub/hard") == b"a" and pub.tree()["data/set/sub/rel"] == "link:a"
    replacement = tar_bytes({"new.txt": b"new"}, compress=True)
    pub.ok("ingest", "-t", "-", "-b", "data/set", "-d", "data/set", FQRN, stdin=replacement)
    assert pub.revision() == 3
    assert {k for k in pub.tree() if k.startswith("data/")} == {"data/keep", "data/set", "data/set/new.txt"}
    assert set(pub.log()[-1]["changed"]) == {"data/set/new.txt", "data/set/old.txt", "data/set/sub",
                                             "data/set/sub/a", "data/set/sub/hard", "data/set/sub/rel"}


@pytest.mark.parametrize("content", [
    b"this is not a tar archive at all" * 40,
    gzip.compress(tar_bytes({"a": os.urandom(5000)}))[:2000],  # truncated
    b"",
])
def test_ingest_of_a_bad_tar_publishes_nothing(pub, tmp_path, content):
    pub.publish_files({"data/keep": b"keep"})
    before = snapshot(pub.union)
    tarball = tmp_path / "bad.tar"
    tarball.write_bytes(content)
    assert "nothing published" in pub.fails(1, "ingest", "-t", str(tarball), "-b", "data/new", "-d", "data/new", FQRN)
    assert pub.revision() == 1 and not pub.in_transaction()
    assert snapshot(pub.union) == before


@pytest.mark.parametrize("members", [
    {"ok": b"ok", "../escape": b"x"},
    {"/etc/abs": b"x"},
    {"link": ("symlink", "../../outside")},
    {"link": ("symlink", "/etc")},
    {"dir/.wh.x": b""},
])
def test_ingest_refuses_escaping_or_unpublishable_members(pub, tmp_path, members):
    before = snapshot(pub.root)
    assert "nothing published" in pub.fails(1, "ingest", "-t", "-", "-b", "data", FQRN, stdin=tar_bytes(members))
    assert pub.revision() == 0 and not pub.in_transaction()
    assert os.listdir(pub.union) == []
    after = snapshot(pub.root)
    assert {p for p in set(after) - set(before) if "srv/cvmfs-standin" not in p and "var/spool" not in p} == set()


def test_ingest_never_writes_or_deletes_through_a_published_symlink(pub, tmp_path):
    outside = tmp_path / "outside"
    (outside / "set").mkdir(parents=True)
    (outside / "victim").write_bytes(b"victim")
    pub.ok("transaction", FQRN)
    os.symlink(str(outside), os.path.join(pub.union, "data"))
    os.mkdir(os.path.join(pub.union, "top"))
    os.symlink(str(outside), os.path.join(pub.union, "top", "link"))
    pub.ok("publish", FQRN)
    tarball = tar_bytes({"f": b"f"})
    assert "symbolic link" in pub.fails(1, "ingest", "-t", "-", "-b", "data", FQRN, stdin=tarball)
    assert "symbolic link" in pub.fails(1, "ingest", "-t", "-", "-b", "top", "-d", "top/link/victim", FQRN,
                                        stdin=tarball)
    assert "symbolic link" in pub.fails(1, "ingest", "-t", "-", "-b", "top", FQRN,
                                        stdin=tar_bytes({"link/set/f": b"f"}))
    assert sorted(os.listdir(outside)) == ["set", "victim"] and os.listdir(outside / "set") == []
    assert pub.revision() == 1


def test_ingest_needs_the_parent_of_base_dir_and_no_open_transaction(pub):
    tarball = tar_bytes({"f": b"f"})
    assert "does not exist" in pub.fails(1, "ingest", "-t", "-", "-b", "no/parent", FQRN, stdin=tarball)
    pub.ok("transaction", FQRN)
    assert "already open" in pub.fails(1, "ingest", "-t", "-", "-b", "top", FQRN, stdin=tarball)
    assert pub.in_transaction()


# --- rmfs ---------------------------------------------------------------------------------------------------------

def test_rmfs_keeps_keys_with_p_and_removes_everything_else(pub):
    pub.publish_files({"f": b"f"})
    gateway_repo = os.path.join(pub.root, "srv", "cvmfs-standin", "gateway", FQRN)
    assert os.path.isdir(gateway_repo)
    assert "not removing" in pub.fails(1, "rmfs", FQRN, stdin=b"n\n")
    pub.ok("rmfs", "-f", "-p", FQRN)
    assert pub.ok("list") == ""
    for path in (pub.union, pub.spool, gateway_repo):
        assert not os.path.exists(path)
    assert sorted(os.listdir(pub.keys)) == [FQRN + s for s in (".crt", ".gw", ".pub")]
    assert pub.mkfs().returncode == 0  # the same keys again: no overwrite complaint
    pub.ok("rmfs", FQRN, stdin=b"y\n")
    assert os.listdir(pub.keys) == []
    pub.fails(1, "rmfs", "-f", FQRN)


def test_rmfs_keeps_published_data_another_publisher_uses(pair):
    first, second = pair
    first.publish_files({"f": b"f"})
    first.ok("rmfs", "-f", FQRN)
    assert second.read("f") == b"f"
    second.ok("transaction", FQRN)
