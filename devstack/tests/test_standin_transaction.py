"""transaction, publish, abort, leases of the stand-in; each test names the contract row it covers."""

import json
import os
import pwd
import shutil
import time

import pytest
from harness import FQRN, Publisher, snapshot, standin


# --- transaction --------------------------------------------------------------------------------------------------

def test_publish_makes_numbered_revisions_with_content(pub):
    pub.ok("transaction", FQRN)
    assert pub.in_transaction()
    assert pub.ok("list") == f"{FQRN} (stratum0 / gw - in transaction)\n"
    pub.write("a/one.txt", b"one")
    pub.write("a/run.sh", b"#!/bin/sh\n")
    os.chmod(os.path.join(pub.union, "a/run.sh"), 0o755)
    os.symlink("one.txt", os.path.join(pub.union, "a/link"))
    assert pub.revision() == 0  # nothing visible before publish
    pub.ok("publish", FQRN)
    assert not pub.in_transaction()
    assert pub.revision() == 1
    tree = pub.tree()
    assert set(tree) == {"a", "a/one.txt", "a/run.sh", "a/link"}
    assert tree["a"] == "dir" and tree["a/link"] == "link:one.txt"
    assert pub.read("a/one.txt") == b"one" and pub.read("/a/run.sh") == b"#!/bin/sh\n"
    manifest = standin.published_manifest(pub.root, FQRN)
    assert manifest["a/run.sh"]["mode"] == 0o755 and manifest["a/run.sh"]["uid"] == os.getuid()

    pub.publish_files({"a/one.txt": b"ONE!"})
    assert pub.revision() == 2
    assert pub.read("a/one.txt") == b"ONE!" and pub.read("a/one.txt", rev=1) == b"one"
    assert pub.log()[-1]["changed"] == ["a/one.txt"]


def test_publish_prints_no_revision_the_rdonly_revision_attribute_has_it(pub):
    """Contract: gateway publish prints only "Changes submitted to repository gateway"; the revision is read with
    `attr -qg revision /var/spool/cvmfs/<fqrn>/rdonly`. The old stand-in printed the number and had no attribute."""
    pub.ok("transaction", FQRN)
    pub.write("f", b"f")
    out = pub.ok("publish", FQRN)
    assert out == "Changes submitted to repository gateway\n"
    rdonly = os.path.join(pub.spool, "rdonly")
    assert os.getxattr(rdonly, "user.revision") == b"1" and pub.mounted_revision() == pub.revision() == 1
    assert shutil.which("attr") is None or os.popen(f"attr -qg revision {rdonly}").read() == "1"


def test_exit_codes_not_found_not_in_transaction_parent_missing_already_open(pub):
    for command in (["transaction"], ["publish"], ["abort", "-f"], ["rmfs", "-f"]):
        assert "not found" in pub.fails(1, *command, "missing.example.org")
    assert "non-existing path /no" in pub.fails(2, "transaction", f"{FQRN}/no/such")
    pub.ok("transaction", FQRN)
    assert "already open" in pub.fails(17, "transaction", FQRN)
    assert "already open" in pub.fails(17, "transaction", "-t", "1", FQRN)


def test_publish_not_in_a_transaction_fails_1_on_stdout(pub):
    """Contract: publish 1 "not in a transaction" (on stdout)."""
    result = pub.run("publish", FQRN)
    assert result.returncode == 1
    assert f"Repository {FQRN} is not in a transaction" in result.stdout.decode()
    assert f"Repository {FQRN} is not in a transaction" in pub.fails(22, "abort", "-f", FQRN)


def test_transaction_20_when_the_subpath_parent_is_not_a_directory(pub):
    """Contract: transaction 20 (subpath parent not a directory); no lease is left behind."""
    pub.publish_files({"file": b"f"})
    assert "which is not a directory" in pub.fails(20, "transaction", f"{FQRN}/file/sub")
    assert not pub.in_transaction() and pub.leases() == [] and not os.path.exists(pub.token)


def test_transaction_retry_timeout_takes_whole_seconds(pub):
    """Contract: `transaction -t` is whole seconds (0 = forever). The old stand-in took fractions."""
    assert "invalid int value" in pub.fails(1, "transaction", "-t", "0.3", FQRN)
    assert not pub.in_transaction()


def test_transaction_lease_left_by_a_killed_publisher_blocks_16_until_it_expires(tmp_path):
    """Contract: 16 lease busy, including a lease this host left behind, until it expires (gateway
    max_lease_time). The old stand-in ignored this host's own leases and had no expiry."""
    # A long lease, then made to expire 2 s from now by hand: the checks cannot race the clock under load.
    publisher = Publisher(tmp_path / "root", CVMFS_STANDIN_LEASE_SECONDS="3600")
    assert publisher.mkfs().returncode == 0
    publisher.ok("transaction", FQRN)
    os.unlink(publisher.token)  # killed mid-way and its spool cleaned by hand: the gateway still holds the lease
    os.unlink(publisher.lock)
    assert "publisher pub holds" in publisher.fails(16, "transaction", FQRN)
    publisher.fails(22, "abort", "-f", FQRN)  # no token: abort cannot release the lease...
    assert "publisher pub holds" in publisher.fails(16, "transaction", FQRN)  # ...it still blocks
    gateway = standin.Local(publisher.root, FQRN).gateway()
    with gateway.locked():
        gateway.save_leases([dict(lease, expires=time.time() + 2) for lease in gateway.leases()])
    publisher.ok("transaction", "-t", "60", FQRN)  # retries 16 until the lease expires
    assert publisher.in_transaction()


def test_transaction_reuses_a_present_session_token_without_a_new_lease(pub):
    """Contract: if session_token exists, transaction reuses it without asking the gateway (so the lease path is
    the old one: writes outside it are dropped at publish). The old stand-in always took a new lease."""
    pub.publish_files({"a/seed": b"seed", "b/seed": b"seed"})
    pub.ok("transaction", f"{FQRN}/a")
    leases = pub.leases()
    os.unlink(pub.lock)  # a crash between the lease and the lock: a lone session_token
    pub.ok("transaction", FQRN)  # the whole repository asked for...
    assert pub.leases() == leases  # ...but no new lease: the old one, on /a, is reused
    pub.write("a/new", b"inside the lease")
    pub.write("b/new", b"outside the lease")
    pub.ok("publish", FQRN)
    assert "a/new" in pub.tree() and "b/new" not in pub.tree()


def test_commit_on_an_expired_lease_fails_1_and_the_transaction_stays_open(tmp_path):
    """Contract: a commit on an expired lease is rejected (1); after any publish failure the transaction stays
    open; abort -f drops the stale token. The old stand-in had no lease expiry."""
    publisher = Publisher(tmp_path / "root", CVMFS_STANDIN_LEASE_SECONDS="1")
    assert publisher.mkfs().returncode == 0
    publisher.ok("transaction", FQRN)
    publisher.write("late", b"late")
    deadline = time.monotonic() + 60
    while publisher.leases() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "unknown or expired" in publisher.fails(1, "publish", FQRN)
    assert publisher.in_transaction() and publisher.revision() == 0
    assert "aborted" in publisher.ok("abort", "-f", FQRN)
    assert not os.path.exists(publisher.token) and not publisher.in_transaction()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give the key to another user")
def test_transaction_fails_1_when_the_owner_cannot_read_the_gateway_key(tmp_path):
    """Contract: the owner (CVMFS_USER) must be able to read .gw: transaction switches to the owner before
    reading it (1 "unreadable key"). The old stand-in never looked at the key."""
    publisher = Publisher(tmp_path / "root")
    assert publisher.mkfs(owner="nobody").returncode == 0
    os.chown(os.path.join(publisher.keys, FQRN + ".gw"), 0, 0)  # as if written by root after mkfs
    assert "not readable by the repository owner nobody" in publisher.fails(1, "transaction", FQRN)
    nobody = pwd.getpwnam("nobody")
    os.chown(os.path.join(publisher.keys, FQRN + ".gw"), nobody.pw_uid, nobody.pw_gid)
    publisher.ok("transaction", FQRN)


def test_two_racing_processes_get_one_transaction(pub):
    for _ in range(3):
        racers = [pub.start("transaction", FQRN) for _ in range(2)]
        codes = sorted(racer.wait(timeout=60) for racer in racers)
        for racer in racers:
            racer.stdout.close()
            racer.stderr.close()
        assert codes == [0, 17]
        pub.ok("abort", "-f", FQRN)


# --- publish ------------------------------------------------------------------------------------------------------

def test_publish_fails_1_with_cwd_inside_the_union_and_the_transaction_stays_open(pub):
    """Contract: publish 1 when the caller's cwd is inside /cvmfs/<fqrn>; the transaction stays open."""
    pub.ok("transaction", FQRN)
    pub.write("sub/f", b"f")
    for cwd in (pub.union, os.path.join(pub.union, "sub")):
        assert "Current working directory is in" in pub.fails(1, "publish", FQRN, cwd=cwd)
    assert pub.in_transaction() and pub.revision() == 0
    pub.ok("publish", FQRN, cwd=pub.root)


def test_publish_with_a_reader_holding_a_file_prompts_and_fails_without_f(pub):
    """Contract: without -f, read-only fds on the union make publish prompt; no "y" -> "aborted." 1, the
    transaction stays open. `-f` or CVMFS_FORCE_REMOUNT_WARNING=false avoid it. The old stand-in ignored fds."""
    pub.publish_files({"held": b"held"})
    pub.ok("transaction", FQRN)
    pub.write("new", b"new")
    with open(os.path.join(pub.union, "held"), "rb"):
        assert "aborted." in pub.fails(1, "publish", FQRN)
        assert pub.in_transaction() and pub.revision() == 1
        pub.env["CVMFS_FORCE_REMOUNT_WARNING"] = "false"
        pub.ok("publish", FQRN)
        del pub.env["CVMFS_FORCE_REMOUNT_WARNING"]
        pub.ok("transaction", FQRN)
        pub.write("newer", b"newer")
        pub.ok("publish", "-f", FQRN)
    assert pub.revision() == 3


def test_publish_fails_1_with_a_writable_fd_open_on_the_union(pub):
    """Contract: publish 1 with writable fds open on /cvmfs/<fqrn> (even with -f); the transaction stays open."""
    pub.ok("transaction", FQRN)
    with open(os.path.join(pub.union, "being-written"), "wb") as handle:
        handle.write(b"partial")
        assert "Open writable file descriptors" in pub.fails(1, "publish", "-f", FQRN)
        assert pub.in_transaction()
    pub.ok("publish", "-f", FQRN)
    assert pub.read("being-written") == b"partial"


@pytest.mark.parametrize("bad,message", [
    ("dir/.wh.deleted", "overlay whiteout"),
    (".cvmfs/snapshots", "reserved virtual directory"),
    ("dir/.cvmfscatalog/x", "must be a regular file"),
])
def test_publish_refuses_what_cvmfs_never_publishes_and_stays_in_transaction(pub, bad, message):
    pub.ok("transaction", FQRN)
    pub.write(bad)
    assert message in pub.fails(1, "publish", FQRN)
    assert pub.in_transaction() and pub.revision() == 0
    pub.ok("abort", "-f", FQRN)
    assert os.listdir(pub.union) == []


def test_publish_hashes_only_changed_files(tmp_path):
    publisher = Publisher(tmp_path, CVMFS_STANDIN_RACY_WINDOW_MS="0")  # trust the stat cache at once
    assert publisher.mkfs().returncode == 0
    publisher.publish_files({f"d{i % 5}/f{i}": b"%d" % i for i in range(200)})
    assert publisher.log()[-1]["hashed"] == 200
    publisher.publish_files({"d0/f0": b"changed, longer", "d1/f1": b"changed too", "new": b"new"})
    entry = publisher.log()[-1]
    assert entry["hashed"] == 3
    assert entry["changed"] == ["d0/f0", "d1/f1", "new"]
    assert publisher.read("d1/f1") == b"changed too" and publisher.read("d2/f2") == b"2"


# --- abort --------------------------------------------------------------------------------------------------------

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
    shutil.rmtree(os.path.join(pub.union, "gone"))
    assert "Transaction on" in pub.ok("abort", "-f", FQRN)
    assert snapshot(pub.union) == before
    assert not pub.in_transaction() and pub.revision() == 1
    assert not os.path.exists(pub.token)


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


def test_abort_f_fails_1_with_cwd_inside_the_union(pub):
    """Contract: abort -f 1 with cwd inside the union (cmd_abort.cc); the transaction stays open."""
    pub.ok("transaction", FQRN)
    assert "Current working directory is in" in pub.fails(1, "abort", "-f", FQRN, cwd=pub.union)
    assert pub.in_transaction()
    pub.ok("abort", "-f", FQRN, cwd=pub.root)


def test_abort_outside_a_transaction_exits_22_and_drops_a_stale_token(pair):
    """Contract: abort -f 22 not in a transaction, still drops a stale session_token (and releases its lease)."""
    first, second = pair
    first.ok("transaction", f"{FQRN}")
    os.unlink(first.lock)  # as if the machine crashed mid-transaction: a lone session_token
    assert "publisher pubA holds" in second.fails(16, "transaction", FQRN)
    first.fails(22, "abort", "-f", FQRN)
    assert not os.path.exists(first.token)
    second.ok("transaction", FQRN)


# --- two publishers sharing one gateway ---------------------------------------------------------------------------

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
    assert json.loads(json.dumps(second.mounted_revision())) == 3


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
