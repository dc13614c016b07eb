"""ingest of the stand-in, as in gateway mode; each test names the contract row it covers."""

import gzip
import os

import pytest
from harness import FQRN, snapshot, tar_bytes


def test_ingest_unpacks_merging_into_base_dir_in_one_revision(pub, tmp_path):
    pub.publish_files({"data/keep": b"keep", "data/set/old.txt": b"old"})
    tarball = tmp_path / "one.tar"
    tarball.write_bytes(tar_bytes({"./": ("dir",), "new.txt": b"new", "sub/a": b"a", "sub/hard": ("hardlink", "sub/a"),
                                   "sub/rel": ("symlink", "a")}))
    assert pub.ok("ingest", "-t", str(tarball), "-b", "/data/set", FQRN) == "Changes submitted to repository gateway\n"
    assert pub.revision() == 2 and pub.mounted_revision() == 2 and not pub.in_transaction()
    assert pub.read("data/set/sub/hard") == b"a" and pub.tree()["data/set/sub/rel"] == "link:a"
    assert pub.read("data/set/old.txt") == b"old"  # merged, not replaced
    pub.ok("ingest", "-t", "-", "-b", "data/set", FQRN, stdin=tar_bytes({"new.txt": b"newer"}))
    assert pub.revision() == 3 and pub.read("data/set/new.txt") == b"newer"
    assert pub.log()[-1]["changed"] == ["data/set/new.txt"]


def test_ingest_t_with_d_fails_1_before_any_transaction(pub, tmp_path):
    """Contract: gateway mode, `ingest -t … -d …` dies with 1 before any transaction (ingest.sh). The old
    stand-in did both in one revision, which production relied on."""
    pub.publish_files({"data/set/old": b"old"})
    tarball = tmp_path / "t.tar"
    tarball.write_bytes(tar_bytes({"new": b"new"}))
    out = pub.fails(1, "ingest", "-t", str(tarball), "-b", "data/set", "-d", "data/set", FQRN)
    assert "Could not delete and add a file in the same transaction while using gateway" in out
    assert pub.revision() == 1 and not pub.in_transaction() and pub.leases() == []


def test_ingest_several_d_fails_1_before_any_transaction(pub):
    """Contract: gateway mode, more than one `-d` dies with 1 before any transaction."""
    pub.publish_files({"a": b"a", "b": b"b"})
    assert "Could not delete multiple paths" in pub.fails(1, "ingest", "-d", "a", "-d", "b", FQRN)
    assert pub.revision() == 1 and set(pub.tree()) == {"a", "b"} and pub.leases() == []


def test_ingest_d_alone_deletes_in_its_own_revision(pub):
    """Contract: `ingest -d <path>` deletes one path in its own revision (lease <fqrn>/<path>)."""
    pub.publish_files({"sw/v1/a": b"a", "sw/v2/b": b"b"})
    assert pub.ok("ingest", "-d", "sw/v1", FQRN) == "Changes submitted to repository gateway\n"
    assert pub.revision() == 2 and set(pub.tree()) == {"sw", "sw/v2", "sw/v2/b"}
    assert pub.log()[-1]["lease_path"] == "sw/v1"


@pytest.mark.parametrize("via", ["file", "stdin"])
def test_ingest_compressed_tar_fails_1_and_publishes_nothing(pub, tmp_path, via):
    """Contract: ingest reads uncompressed tar only (`-t -` reads a plain tar from stdin); compressed input -> 1.
    The old stand-in decompressed gzip itself, hiding that production handed .tar.gz to ingest."""
    compressed = tar_bytes({"f": b"f"}, compress=True)
    if via == "file":
        tarball = tmp_path / "t.tar.gz"
        tarball.write_bytes(compressed)
        out = pub.fails(1, "ingest", "-t", str(tarball), "-b", "data", FQRN)
    else:
        out = pub.fails(1, "ingest", "-t", "-", "-b", "data", FQRN, stdin=compressed)
    assert "nothing published" in out and "uncompressed tar" in out
    assert pub.revision() == 0 and not pub.in_transaction() and pub.leases() == []
    assert os.listdir(pub.union) == []


@pytest.mark.parametrize("content", [
    b"this is not a tar archive at all" * 40,
    tar_bytes({"a": os.urandom(5000)})[:2000],  # truncated
])
def test_ingest_of_a_bad_tar_fails_1_and_publishes_nothing(pub, tmp_path, content):
    pub.publish_files({"data/keep": b"keep"})
    before = snapshot(pub.union)
    tarball = tmp_path / "bad.tar"
    tarball.write_bytes(content)
    assert "nothing published" in pub.fails(1, "ingest", "-t", str(tarball), "-b", "data/new", FQRN)
    assert pub.revision() == 1 and not pub.in_transaction()
    assert snapshot(pub.union) == before


def test_ingest_busy_lease_fails_1_never_16(pair):
    """Contract: ingest on a busy lease -> 1 ("Impossible to start a transaction"), never 16."""
    first, second = pair
    first.ok("transaction", FQRN)
    out = second.fails(1, "ingest", "-t", "-", "-b", "data", FQRN, stdin=tar_bytes({"f": b"f"}))
    assert "Impossible to start a transaction" in out and "path_busy" in out
    assert "Impossible to start a transaction" in second.fails(1, "ingest", "-d", "data", FQRN)
    assert first.in_transaction()


def test_ingest_with_a_transaction_already_open_fails_1_never_17(pub):
    """Contract: ingest while this host has a transaction open -> 1, never 17; the open transaction is kept."""
    pub.ok("transaction", FQRN)
    out = pub.fails(1, "ingest", "-t", "-", "-b", "top", FQRN, stdin=tar_bytes({"f": b"f"}))
    assert "already open" in out and "Impossible to start a transaction" in out
    assert pub.in_transaction()


def test_ingest_needs_the_parent_of_base_dir_fails_1(pub):
    assert "Impossible to start a transaction" in pub.fails(1, "ingest", "-t", "-", "-b", "no/parent", FQRN,
                                                            stdin=tar_bytes({"f": b"f"}))


def test_ingest_t_needs_b_and_b_needs_t(pub):
    assert "Please set the base directory" in pub.fails(1, "ingest", "-t", "-", FQRN)
    assert "Please provide the tarball" in pub.fails(1, "ingest", "-b", "x", FQRN)
    assert "Please provide some parameters" in pub.fails(1, "ingest", FQRN)


@pytest.mark.parametrize("members", [
    {"ok": b"ok", "../escape": b"x"},
    {"/etc/abs": b"x"},
    {"link": ("symlink", "../../outside")},
    {"link": ("symlink", "/etc")},
    {"dir/.wh.x": b""},
])
def test_stricter_than_real_ingest_refuses_escaping_or_unpublishable_members(pub, members):
    """The real ingest unpacks such members (swissknife normalises them); the stand-in refuses the whole tar."""
    before = snapshot(pub.root)
    assert "nothing published" in pub.fails(1, "ingest", "-t", "-", "-b", "data", FQRN, stdin=tar_bytes(members))
    assert pub.revision() == 0 and not pub.in_transaction()
    assert os.listdir(pub.union) == []
    after = snapshot(pub.root)
    assert {p for p in set(after) - set(before) if "srv/cvmfs-standin" not in p and "var/spool" not in p} == set()


def test_stricter_than_real_ingest_never_writes_or_deletes_through_a_published_symlink(pub, tmp_path):
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
    assert "which is not a directory" in pub.fails(1, "ingest", "-d", "top/link/victim", FQRN)  # as the real one
    assert "symbolic link" in pub.fails(1, "ingest", "-t", "-", "-b", "top", FQRN,
                                        stdin=tar_bytes({"link/set/f": b"f"}))
    assert sorted(os.listdir(outside)) == ["set", "victim"] and os.listdir(outside / "set") == []
    assert pub.revision() == 1


def test_ingest_gzip_helper_is_really_compressed():
    assert gzip.decompress(tar_bytes({"f": b"f"}, compress=True))[:1] != b"\x1f"
