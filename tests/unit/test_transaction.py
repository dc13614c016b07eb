"""_transaction (lock, marker, stale recovery, lease budget) and the cvmfs_server pieces the sync relies on on a
gateway (streamed ingest of a compressed tarball, ingest's busy exit 1, the rdonly revision); no services."""
import gzip
import io
import os
import stat
import sys
import tarfile

import pytest

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _cvmfs as cvmfs
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _sync_publish as publish
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _transaction as txn
from tarballs import tarball_bytes

FQRN = "alice.infn.it"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_lock_is_exclusive_close_on_exec_and_names_its_holder(tmp_path):
    first = txn.RepositoryLock(str(tmp_path), FQRN).acquire()
    assert not os.get_inheritable(first.fd), "cvmfs_server and other children must not inherit the lock"
    clock = Clock()
    second = txn.RepositoryLock(str(tmp_path), FQRN, timeout=30, sleep=clock.sleep, clock=clock)
    with pytest.raises(txn.TransactionError) as failure:
        second.acquire()
    assert "another sync of alice.infn.it is running on this host (pid %d on " % os.getpid() in failure.value.msg
    assert "waited 30 s (lock_timeout)" in failure.value.msg and clock.now >= 30
    first.release()
    with txn.RepositoryLock(str(tmp_path), FQRN, timeout=0) as third:
        assert third.fd is not None
    assert txn.RepositoryLock(str(tmp_path), "other.infn.it", timeout=0).acquire().fd is not None


class FakeServer:
    """The files recover_stale looks at, and the abort it may run."""

    def __init__(self, tmp_path, in_transaction=False, token=None, abort_rc=0):
        self.spool = tmp_path / "spool"
        self.spool.mkdir(exist_ok=True)
        self.lock = self.spool / "in_transaction.lock"
        if in_transaction:
            self.lock.write_text("x")
        if token:
            (self.spool / "session_token").write_text(token)
        self.abort_rc, self.aborted = abort_rc, 0

    def in_transaction(self, fqrn):
        return self.lock.exists()

    def has_session_token(self, fqrn):
        return os.path.exists(self.session_token(fqrn))

    def session_token(self, fqrn):
        return str(self.spool / "session_token")

    def abort(self, fqrn):
        self.aborted += 1
        for path in (self.lock, self.spool / "session_token"):
            if path.exists():
                path.unlink()
        if self.abort_rc:
            raise cvmfs.CvmfsCommandError(["cvmfs_server", "abort", "-f", fqrn], self.abort_rc, "", "nothing open")


def test_recover_stale_aborts_only_what_the_marker_claims(tmp_path):
    marker = txn.TransactionMarker(str(tmp_path / "state"), FQRN)
    assert txn.recover_stale(FakeServer(tmp_path), FQRN, marker, True) is None

    foreign = FakeServer(tmp_path, in_transaction=True, token="operator")
    with pytest.raises(txn.TransactionError) as failure:
        txn.recover_stale(foreign, FQRN, marker, True)
    assert "that this sync did not open" in failure.value.msg and failure.value.details == {"foreign": True}
    assert "'cvmfs_server abort -f alice.infn.it'" in failure.value.msg and foreign.aborted == 0

    marker.opening("transaction")
    marker.opened(foreign, FQRN)  # records the token "operator" as ours
    (tmp_path / "spool" / "session_token").write_text("a later one")
    with pytest.raises(txn.TransactionError, match="did not open"):
        txn.recover_stale(foreign, FQRN, marker, True)  # a token the marker does not know is not ours
    (tmp_path / "spool" / "session_token").write_text("operator")
    with pytest.raises(txn.TransactionError, match="left by an interrupted sync"):
        txn.recover_stale(foreign, FQRN, marker, False)
    assert txn.recover_stale(foreign, FQRN, marker, True, check_mode=True) == "an open transaction"
    assert foreign.aborted == 0
    assert txn.recover_stale(foreign, FQRN, marker, True) == "an open transaction" and foreign.aborted == 1
    assert marker.read() is None


def test_recover_stale_drops_a_lone_token_of_ours_accepting_22(tmp_path):
    marker = txn.TransactionMarker(str(tmp_path / "state"), FQRN)
    marker.opening("ingest cvmfs/t.tgz")  # killed before the token was recorded
    lone = FakeServer(tmp_path, token="t", abort_rc=cvmfs.RC_NOT_IN_TRANSACTION)
    assert "lone session_token" in txn.recover_stale(lone, FQRN, marker, True)
    assert not lone.has_session_token(FQRN) and marker.read() is None


def test_recover_stale_reports_an_abort_that_fails(tmp_path):
    marker = txn.TransactionMarker(str(tmp_path / "state"), FQRN)
    marker.opening("transaction")
    broken = FakeServer(tmp_path, in_transaction=True, abort_rc=5)
    with pytest.raises(txn.TransactionError, match="cannot abort the stale transaction"):
        txn.recover_stale(broken, FQRN, marker, True)
    assert marker.read() is not None, "kept: the next run still knows the transaction is ours"


def test_lease_budget_leaves_two_thirds_for_publish():
    clock = Clock()
    budget = txn.LeaseBudget(7200, clock=clock)
    assert not budget.exhausted()
    budget.start()
    clock.now = 2399
    assert not budget.exhausted()
    clock.now = 2400
    assert budget.exhausted()
    with pytest.raises(txn.TransactionError):
        txn.LeaseBudget(0)


def plain_tar(members):
    return tarball_bytes([("file", name, data) for name, data in members.items()])


@pytest.fixture
def recording_binary(tmp_path):
    """A cvmfs_server that records its argv and its stdin (as a real ingest reads it)."""
    script = tmp_path / "cvmfs_server"
    script.write_text("#!%s\nimport sys, json\nopen(%r, 'w').write(json.dumps(sys.argv[1:]))\n"
                      "open(%r, 'wb').write(sys.stdin.buffer.read())\n"
                      % (sys.executable, str(tmp_path / "argv"), str(tmp_path / "stdin")))
    script.chmod(0o755)
    return str(script)


def test_ingest_streams_a_gzip_tarball_decompressed_and_passes_a_plain_one_by_path(tmp_path, recording_binary):
    tar = plain_tar({"a": b"a" * 5000})
    (tmp_path / "t.tgz").write_bytes(gzip.compress(tar))
    server = cvmfs.CvmfsServer(recording_binary)
    server.ingest(FQRN, str(tmp_path / "t.tgz"), "sw/t")
    assert (tmp_path / "argv").read_text() == '["ingest", "-t", "-", "-b", "sw/t", "alice.infn.it"]'
    assert (tmp_path / "stdin").read_bytes() == tar, "ingest reads uncompressed tar only"
    (tmp_path / "t.tar").write_bytes(tar)
    server.ingest(FQRN, str(tmp_path / "t.tar"), "sw/t")
    assert (tmp_path / "argv").read_text() == '["ingest", "-t", "%s", "-b", "sw/t", "alice.infn.it"]' % (
        tmp_path / "t.tar")


def test_ingest_of_a_corrupt_gzip_fails_naming_it(tmp_path, recording_binary):
    (tmp_path / "t.tgz").write_bytes(gzip.compress(plain_tar({"a": b"a"}))[:30])
    with pytest.raises(cvmfs.CvmfsCommandError) as failure:
        cvmfs.CvmfsServer(recording_binary).ingest(FQRN, str(tmp_path / "t.tgz"), "t")
    assert failure.value.rc == 1 and "cannot decompress the tarball" in failure.value.msg


def test_ingest_exit_1_is_retried_only_when_it_could_not_start_its_transaction():
    def ingest_error(text):
        return cvmfs.CvmfsCommandError(["cvmfs_server", "ingest"], 1, "", text)

    busy = ingest_error("CernVM-FS transaction error: path_busy\nImpossible to start a transaction")
    assert txn.ingest_lease_busy(busy) and not txn.transaction_busy(busy)
    assert not txn.ingest_lease_busy(ingest_error("Synchronization failed"))
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise busy
        return "published"

    assert txn.with_busy_retries(flaky, 5, sleep=lambda s: None, busy=txn.ingest_lease_busy) == "published"
    with pytest.raises(cvmfs.CvmfsError, match="its lease path is busy"):
        txn.with_busy_retries(lambda: (_ for _ in ()).throw(busy), 2, sleep=lambda s: None,
                              busy=txn.ingest_lease_busy)
    with pytest.raises(cvmfs.CvmfsCommandError):
        txn.with_busy_retries(lambda: (_ for _ in ()).throw(busy), 2, sleep=lambda s: None)


def test_revision_is_read_from_the_rdonly_attribute_never_from_output(tmp_path):
    server = cvmfs.CvmfsServer(root=str(tmp_path))
    rdonly = tmp_path / "var/spool/cvmfs" / FQRN / "rdonly"
    assert server.mounted_revision(FQRN) is None
    rdonly.mkdir(parents=True)
    os.setxattr(str(rdonly), "user.revision", b"42")
    assert server.mounted_revision(FQRN) == 42


def test_unpack_tarball_uses_the_data_filter(tmp_path):
    good = tmp_path / "good.tgz"
    good.write_bytes(gzip.compress(plain_tar({"bin/tool": b"tool"})))
    tree = publish.unpack_tarball(str(good), str(tmp_path / "tree"))
    assert (tmp_path / "tree/bin/tool").read_bytes() == b"tool"
    assert stat.S_IMODE(os.stat(os.path.join(tree, "bin/tool")).st_mode) & 0o022 == 0
    bad = io.BytesIO()
    with tarfile.open(fileobj=bad, mode="w") as archive:
        link = tarfile.TarInfo("escape")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    (tmp_path / "bad.tar").write_bytes(bad.getvalue())
    with pytest.raises(publish.PublishError, match="cannot unpack tarball"):
        publish.unpack_tarball(str(tmp_path / "bad.tar"), str(tmp_path / "bad"))


def test_owner_ids_only_when_root_and_the_owner_is_someone_else(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert publish.owner_ids({"CVMFS_USER": "nobody"}) is None
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert publish.owner_ids({"CVMFS_USER": "root"}) is None
    import pwd

    nobody = pwd.getpwnam("nobody")
    assert publish.owner_ids({"CVMFS_USER": "nobody"}) == (nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(publish.PublishError, match="no-such-user is not a user"):
        publish.owner_ids({"CVMFS_USER": "no-such-user"})
