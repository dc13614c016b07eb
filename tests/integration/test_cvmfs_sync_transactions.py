"""cvmfs_sync against a strict cvmfs_server stand-in: how it owns its transactions (lock, marker, stale recovery,
lease budget), how tarballs are applied on a gateway, and what it must never do to someone else's transaction."""
import os
import threading
import time
from pathlib import Path

import pytest

from sync_repo import Repo, sha, standin, tgz

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _cvmfs, _sync, _transaction


@pytest.fixture
def repo(stack, s3, unique_name, tmp_path):
    return Repo(stack, s3, unique_name, tmp_path)


def state_dir(repo):
    return str(Path(repo.root) / "var/lib/cvmfs-publisher/state")


def server(repo):
    return _cvmfs.CvmfsServer(repo.bin, repo.root)


def token_file(repo):
    return Path(repo.root) / "var/spool/cvmfs" / repo.fqrn / "session_token"


def open_as_interrupted_sync(repo):
    """What a sync killed inside its transaction leaves: the marker, then the open transaction and its token."""
    marker = _transaction.TransactionMarker(state_dir(repo), repo.fqrn)
    marker.opening("transaction")
    repo.cvmfs("transaction", repo.fqrn)
    marker.opened(server(repo), repo.fqrn)
    (Path(repo.root) / "cvmfs" / repo.fqrn / "junk").write_text("left by the killed sync")


# --- tarballs on a gateway ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,mode", [("sw/v1.tar", "w"), ("sw/v1.tar.gz", "w:gz"), ("sw/v1.tgz", "w:gz")])
def test_replaced_tarball_changes_its_folder_in_one_revision(repo, name, mode):
    """Contract: gateway ingest refuses -t with -d and reads plain tar only. A replaced tarball must still change
    /sw/v1 from the old content to exactly the new members in ONE revision (never missing, mixed or stale)."""
    key = "cvmfs/" + name
    repo.put("cvmfs/sw/keep", b"keep")
    repo.put(key, tgz({"bin/tool": b"tool 1", "share/old": b"old", "bin/link": ("symlink", "tool")}, mode))
    first = repo.sync()
    assert first["added"] == 2 and len(first["revisions"]) == 2, "plain files, then the new tarball's ingest"
    old = repo.tree()
    assert old["sw/v1/share/old"] == sha(b"old") and old["sw/v1/bin/link"] == "link:tool"

    repo.put(key, tgz({"bin/tool": b"tool 2", "new/file": b"new"}, mode))
    second = repo.sync(mode="changes", keys=[key])
    assert second["updated"] == 1 and second["revisions"] == [first["revision"] + 1], "exactly one revision"
    assert repo.tree(second["revision"] - 1) == old, "the revision before shows the old content, complete"
    new = {p: v for p, v in repo.tree().items() if p.startswith("sw/v1")}
    assert new == {"sw/v1": "dir", "sw/v1/bin": "dir", "sw/v1/bin/tool": sha(b"tool 2"), "sw/v1/new": "dir",
                   "sw/v1/new/file": sha(b"new")}
    assert repo.files()["sw/keep"] == sha(b"keep")
    log = standin.publish_log(repo.root, repo.fqrn)
    assert [entry["command"] for entry in log[1:]] == ["publish", "ingest", "publish"], "no ingest -t -d"

    repo.delete(key)
    removed = repo.sync(mode="changes", keys=[key])
    assert removed["deleted"] == 1 and not [p for p in repo.tree() if p.startswith("sw/v1")]
    assert not repo.sync()["changed"]


def test_compressed_new_tarball_is_streamed_decompressed_to_ingest(repo):
    """Contract: ingest reads uncompressed tar only: a .tgz whose folder is new goes to `ingest -t -` decompressed
    on the fly (the strict stand-in refuses gzip input with exit 1)."""
    repo.put("cvmfs/t.tgz", tgz({"a/b": b"b" * 100000}))
    result = repo.sync()
    assert result["added"] == 1 and repo.files() == {"t/a/b": sha(b"b" * 100000)}
    assert standin.publish_log(repo.root, repo.fqrn)[-1]["command"] == "ingest"


def ingest_refusing_wrapper(repo, tmp_path):
    """A cvmfs_server whose `ingest` of base dir `sw/bad` fails as a gateway refusing that tar does (exit 1,
    "Synchronization failed"), counting its calls; while the file `down` exists, `transaction` fails too, as when
    the gateway cannot be reached."""
    wrapper, calls, down = tmp_path / "cvmfs_server_refusing_ingest", tmp_path / "ingest-calls", tmp_path / "down"
    wrapper.write_text(
        '#!/bin/sh\nif [ "$1" = ingest ] && [ "$5" = sw/bad ]; then echo x >> %s; '
        'echo "Synchronization failed\n\nExecuted Command:\ncvmfs_swissknife ingest (injected)" >&2; exit 1; fi\n'
        'if [ "$1" = transaction ] && [ -e %s ]; then echo "cannot reach the gateway (injected)" >&2; exit 1; fi\n'
        'exec %s "$@"\n' % (calls, down, repo.bin))
    wrapper.chmod(0o755)
    return str(wrapper), calls, down


def test_a_tarball_the_gateway_ingest_refuses_is_refused_alone_and_not_tried_again(repo, tmp_path):
    """Issue 9: a tar that passed our checks but that the gateway's ingest refuses is a per-object refusal (the
    probe could open a transaction, so the gateway works): everything else is published, the run succeeds, and
    the same object is not tried again until it changes."""
    wrapper, calls, _down = ingest_refusing_wrapper(repo, tmp_path)
    repo.put("cvmfs/sw/bad.tgz", tgz({"x": b"x"}))
    repo.put("cvmfs/sw/good.tgz", tgz({"y": b"y"}))
    repo.put("cvmfs/plain", b"plain")
    result = repo.sync(cvmfs_server_bin=wrapper)
    assert repo.files() == {"sw/good/y": sha(b"y"), "plain": sha(b"plain")} and not repo.in_transaction()
    [refused] = result["refusals"]["current"]
    assert refused["key"] == "cvmfs/sw/bad.tgz" and refused["category"] == "ingest"
    assert "the gateway's ingest refused this tarball (exit code 1)" in refused["reason"]
    assert "Synchronization failed" in refused["reason"]
    assert calls.read_text().count("x") == 1
    again = repo.sync(cvmfs_server_bin=wrapper, mode="full")
    assert calls.read_text().count("x") == 1, "an unchanged refused tarball was tried again"
    assert again["refusals"]["count"] == 1 and repo.files() == {"sw/good/y": sha(b"y"), "plain": sha(b"plain")}
    repo.delete("cvmfs/sw/bad.tgz")
    cleared = repo.sync(cvmfs_server_bin=wrapper, mode="full")
    assert cleared["refusals"]["count"] == 0 and cleared["refusals"]["cleared"] == ["cvmfs/sw/bad.tgz"]


def test_an_ingest_failure_while_the_gateway_is_down_fails_the_run_to_be_retried(repo, tmp_path):
    """The same ingest failure is transient when no transaction can be opened either (gateway unreachable): the
    run fails naming the tarball, nothing is refused, and the retry publishes it once the gateway is back."""
    wrapper, calls, down = ingest_refusing_wrapper(repo, tmp_path)
    repo.put("cvmfs/sw/keep", b"keep")
    repo.sync(cvmfs_server_bin=wrapper)  # the folder exists: the next run's only step is the ingest
    repo.put("cvmfs/sw/bad.tgz", tgz({"x": b"x"}))
    down.touch()
    with pytest.raises(_sync.SyncError) as failure:
        _sync.run(repo.params(cvmfs_server_bin=wrapper, transaction_retries=0))
    assert "ingesting tarball cvmfs/sw/bad.tgz into /sw/bad" in failure.value.msg
    assert "Synchronization failed" in failure.value.msg and not repo.in_transaction()
    down.unlink()
    result = repo.sync()  # the real stand-in: the gateway is back and takes the tarball
    assert calls.read_text().count("x") == 1
    assert result["refusals"]["count"] == 0 and repo.files() == {"sw/keep": sha(b"keep"), "sw/bad/x": sha(b"x")}


# --- revision, publish -f, cwd ------------------------------------------------------------------------------------

def test_revision_comes_from_the_rdonly_attribute_and_a_reader_never_fails_publish(repo):
    """Contract: gateway publish prints no revision (read `attr -qg revision .../rdonly`); without -f, read-only
    fds on the union make publish prompt and fail; publish fails with the caller's cwd inside /cvmfs/<fqrn>.
    A reader holds a file open while the sync publishes, and the sync's own cwd is inside the union."""
    repo.put("cvmfs/held", b"v1")
    repo.sync()
    union = Path(repo.root) / "cvmfs" / repo.fqrn
    repo.put("cvmfs/held", b"v2")
    repo.put("cvmfs/other", b"o")
    with open(union / "held", "rb"):
        cwd = os.getcwd()
        os.chdir(union)
        try:
            result = repo.sync()
        finally:
            os.chdir(cwd)
    assert result["revision"] == repo.revision() == standin.mounted_revision(repo.root, repo.fqrn) == 2
    assert repo.files() == {"held": sha(b"v2"), "other": sha(b"o")}


# --- stale transactions: only ours ------------------------------------------------------------------------------

def test_stale_transaction_of_an_interrupted_sync_is_aborted_first(repo):
    repo.put("cvmfs/a", b"a")
    repo.sync()
    open_as_interrupted_sync(repo)
    with pytest.raises(_sync.SyncError) as refused:
        _sync.run(repo.params(abort_stale_transaction=False))
    assert "left by an interrupted sync" in refused.value.msg
    assert repo.in_transaction()
    result = repo.sync()
    assert result["stale_transaction_aborted"] and not repo.in_transaction()
    assert repo.files() == {"a": sha(b"a")} and not token_file(repo).exists()


def test_a_transaction_the_sync_did_not_open_fails_the_run_and_is_never_aborted(repo):
    """Issue 10: an operator's own `cvmfs_server transaction` is never aborted silently: the run fails naming it
    and the commands that close it; their changes stay."""
    repo.put("cvmfs/a", b"a")
    repo.sync()
    repo.cvmfs("transaction", repo.fqrn)
    work = Path(repo.root) / "cvmfs" / repo.fqrn / "operator-work"
    work.write_text("an operator's change")
    repo.put("cvmfs/b", b"b")
    with pytest.raises(_sync.SyncError) as failure:
        _sync.run(repo.params())
    assert "that this sync did not open" in failure.value.msg and failure.value.details["foreign"]
    assert "'cvmfs_server abort -f %s'" % repo.fqrn in failure.value.msg
    assert "'cvmfs_server publish %s'" % repo.fqrn in failure.value.msg
    assert repo.in_transaction() and work.read_text() == "an operator's change"
    repo.cvmfs("publish", repo.fqrn)  # the operator finishes their work
    result = repo.sync()
    assert result["added"] == 1 and repo.files() == {"a": sha(b"a"), "b": sha(b"b"),
                                                     "operator-work": sha(b"an operator's change")}


def test_a_lone_session_token_of_an_interrupted_sync_is_dropped(repo):
    """Contract: `transaction` reuses a present session_token without a new lease; a crash between publish's
    commit and its cleanup leaves one alone. The sync drops it (abort -f: 22, token gone) before it opens a
    transaction, instead of committing on a stale lease."""
    repo.put("cvmfs/a", b"a")
    repo.sync()
    open_as_interrupted_sync(repo)
    (Path(repo.root) / "var/spool/cvmfs" / repo.fqrn / "in_transaction.lock").unlink()
    assert token_file(repo).exists() and not repo.in_transaction()
    repo.put("cvmfs/b", b"b")
    result = repo.sync()
    assert result["stale_transaction_aborted"] and result["added"] == 1
    assert not token_file(repo).exists() and repo.files() == {"a": sha(b"a"), "b": sha(b"b")}


# --- one sync per repository per host -----------------------------------------------------------------------------

def test_a_second_sync_waits_for_the_lock_and_never_touches_the_first(repo):
    """Issue 8 §2 / issue 10: a sync that holds the lock (e.g. an orphan that outlived its daemon, inside its
    transaction) makes the next one wait, never abort its transaction; with lock_timeout it fails naming it."""
    repo.put("cvmfs/a", b"a")
    lock = _transaction.RepositoryLock(state_dir(repo), repo.fqrn).acquire()
    try:
        repo.cvmfs("transaction", repo.fqrn)  # the holder's open transaction
        with pytest.raises(_sync.SyncError) as failure:
            _sync.run(repo.params(lock_timeout=1))
        assert "another sync of %s is running on this host (pid %d" % (repo.fqrn, os.getpid()) in failure.value.msg
        assert repo.in_transaction() and repo.revision() == 0
        done = []
        waiting = threading.Thread(target=lambda: done.append(_sync.run(repo.params())))
        waiting.start()
        time.sleep(3)
        assert not done and repo.in_transaction() and repo.revision() == 0, "the waiting sync touched nothing"
        repo.cvmfs("abort", "-f", repo.fqrn)  # the holder finishes
    finally:
        lock.release()
    waiting.join(timeout=300)
    assert done and done[0]["added"] == 1 and done[0]["durations"]["lock_wait"] > 0
    assert repo.files() == {"a": sha(b"a")}


# --- lease budget -------------------------------------------------------------------------------------------------

def test_a_sync_that_does_not_fit_the_lease_is_split_into_complete_transactions(repo, monkeypatch):
    """Gateway: a commit on an expired lease is rejected. Applying may use a third of max_lease_seconds; with a
    budget that every change uses up, each transaction carries one change and is complete."""
    objects = {"cvmfs/d/%d" % i: b"%d" % i for i in range(5)}
    repo.put_many(objects)
    monkeypatch.setattr(_transaction, "APPLY_SHARE_OF_LEASE", 0.0)  # every change "takes" the whole budget
    result = _sync.run(repo.params(max_lease_seconds=7200))
    assert result["added"] == 5 and len(result["revisions"]) == 5 and result["split_transactions"] == 4
    for number, revision in enumerate(result["revisions"], start=1):
        assert len([p for p in repo.tree(revision) if p.startswith("d/")]) == number
    assert repo.files() == {key[len("cvmfs/"):]: sha(data) for key, data in objects.items()}
    assert not repo.sync()["changed"]


# --- ownership ----------------------------------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another user needs root")
def test_running_as_root_publishes_files_owned_by_the_repository_owner(stack, s3, unique_name, tmp_path):
    """Contract: files written as root are published as uid 0; the owner (-o) must own what the sync writes."""
    import pwd

    repo = Repo(stack, s3, unique_name, tmp_path, owner="nobody")
    nobody = pwd.getpwnam("nobody").pw_uid
    repo.put_many({"cvmfs/d/f": b"f", "cvmfs/t.tgz": tgz({"x": b"x"})})
    repo.sync()
    repo.put("cvmfs/t.tgz", tgz({"y": b"y"}))
    repo.sync()
    manifest = standin.published_manifest(repo.root, repo.fqrn)
    assert {path: entry["uid"] for path, entry in manifest.items() if entry["type"] == "file"} == \
        {"d/f": nobody, "t/y": nobody}
    union = Path(repo.root) / "cvmfs" / repo.fqrn
    assert (union / "d").stat().st_uid == nobody and (union / "t").stat().st_uid == nobody
