"""module_utils/_sync.py, the sync engine, without RGW: the bucket is an in-memory reader with BucketObjects'
interface (list, head, download), cvmfs_server is the devstack stand-in run under a temporary root."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _cvmfs as cvmfs
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _sync
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.modules import cvmfs_sync
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _sync_plan as sp
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _transaction
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw.objects import (
    ObjectGone,
    TransferError,
)

DEVSTACK = Path(__file__).resolve().parents[2] / "devstack"
sys.path.insert(0, str(DEVSTACK))
import standin  # noqa: E402

FQRN = "alice.infn.it"


def md5(data):
    return hashlib.md5(data).hexdigest()


def sha(data):
    return hashlib.sha256(data).hexdigest()


class FakeBucket:
    """A bucket in memory, read the way the engine reads BucketObjects; records what was asked."""

    def __init__(self, objects=None):
        self.objects = dict(objects or {})
        self.heads, self.downloads, self.listings = [], [], 0
        self.vanish_on_download = set()
        self.puts = []
        self.fail_download = None

    def list(self, prefix):
        self.listings += 1
        for key in sorted(self.objects):
            if key.startswith(prefix):
                data = self.objects[key]
                yield sp.Observation(key, '"%s"' % md5(data), len(data))

    def head(self, keys, concurrency):
        self.heads.append(list(keys))
        return [sp.Observation(key, '"%s"' % md5(self.objects[key]), len(self.objects[key]))
                if key in self.objects else sp.Observation(key, None, None) for key in keys]

    def download(self, change, folder):
        self.downloads.append(change.key)
        if self.fail_download:
            raise self.fail_download
        if change.key in self.vanish_on_download or change.key not in self.objects:
            raise ObjectGone(change.key)
        data = self.objects[change.key]
        path = os.path.join(folder, "obj-%d" % len(self.downloads))
        with open(path, "wb") as handle:
            handle.write(data)
        change.etag, change.size = md5(data), len(data)
        return path

    def put(self, key, body, content_type="application/json"):
        self.puts.append(key)
        self.objects[key] = body


@pytest.fixture
def server(tmp_path):
    """The cvmfs_server stand-in under tmp_path, with one repository."""
    root = str(tmp_path / "root")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CVMFS_STANDIN_")}
    env.update(CVMFS_STANDIN_ROOT=root, CVMFS_STANDIN_RACY_WINDOW_MS="0")

    def runner(argv):
        proc = subprocess.run([sys.executable, str(DEVSTACK / "cvmfs_server")] + argv[1:], env=env,
                              capture_output=True, text=True, timeout=120, check=False)
        return proc.returncode, proc.stdout, proc.stderr

    # The same stand-in as an executable, for commands fed through stdin (ingest -t - of a compressed tarball).
    wrapper = tmp_path / "cvmfs_server"
    wrapper.write_text("#!/bin/sh\nCVMFS_STANDIN_ROOT='%s' CVMFS_STANDIN_RACY_WINDOW_MS=0 exec '%s' '%s' \"$@\"\n"
                       % (root, sys.executable, DEVSTACK / "cvmfs_server"))
    wrapper.chmod(0o755)
    server = cvmfs.CvmfsServer(str(wrapper), root, runner)
    keys = tmp_path / "keys"
    keys.mkdir()
    for suffix in ("crt", "pub", "gw"):
        (keys / ("%s.%s" % (FQRN, suffix))).write_text("stand-in key\n")
    server.mkfs(FQRN, "http://127.0.0.1/cvmfs/" + FQRN, "gw,/srv/cvmfs/txn,http://127.0.0.1:4929/api/v1",
                str(keys), "root")
    return server


def settings(server, **overrides):
    params = {name: spec.get("default") for name, spec in cvmfs_sync.ARGUMENT_SPEC.items()}
    params.update(repository=FQRN, cvmfs_root=server.root)
    params.update(overrides)
    return _sync.SyncSettings.from_params(params)


def published(server):
    return {path: digest for path, digest in standin.published_tree(server.root, FQRN).items() if digest != "dir"}


def state_file(server):
    return Path(server.root) / "var/lib/cvmfs-publisher/state" / (FQRN + ".json")


# -- settings ---------------------------------------------------------------------------------------------------

def test_settings_fill_in_every_default_from_the_options():
    chosen = _sync.SyncSettings.from_params(dict(
        {name: spec.get("default") for name, spec in cvmfs_sync.ARGUMENT_SPEC.items()},
        repository=FQRN, prefix="sw", concurrency=0, keys=["cvmfs/a"], cvmfs_root="/tmp/standin"))
    assert chosen.bucket == "alice" and chosen.prefix == "sw/" and chosen.concurrency == 1
    assert chosen.keys == ("cvmfs/a",)
    assert chosen.state_dir == "/tmp/standin/var/lib/cvmfs-publisher/state"
    assert chosen.staging_dir == "/tmp/standin/var/spool/cvmfs-publisher/staging"


def test_settings_refuse_an_invalid_repository_name():
    params = dict({name: spec.get("default") for name, spec in cvmfs_sync.ARGUMENT_SPEC.items()}, repository="alice")
    with pytest.raises(_sync.SyncError, match="expected a fully qualified name <name>.<domain>"):
        _sync.SyncSettings.from_params(params)


# -- whole runs -------------------------------------------------------------------------------------------------

def test_full_sync_publishes_once_and_a_second_run_changes_nothing(server):
    bucket = FakeBucket({"cvmfs/top": b"top", "cvmfs/a/b/deep": b"deep", "outside/skipped": b"no"})
    first = _sync.sync(settings(server), server, bucket)
    assert first.changed and first.mode == "full" and first.revisions == [1] and first.revision == 1
    assert first.state_rebuilt.startswith("no state file yet")
    assert sorted(bucket.downloads) == ["cvmfs/a/b/deep", "cvmfs/top"]
    assert published(server) == {"top": sha(b"top"), "a/b/deep": sha(b"deep")}
    result = first.as_dict()
    assert result["added"] == 2 and result["published_changes"] == 2 and result["objects_downloaded"] == 2
    assert result["paths"]["added"] == ["a/b/deep", "top"] and "state_rebuilt" in result

    second = _sync.sync(settings(server), server, bucket)
    assert not second.changed and second.revisions == [] and len(bucket.downloads) == 2
    result = second.as_dict()
    assert result["unchanged"] == 2 and result["revision"] is None
    assert "published_changes" not in result and "state_rebuilt" not in result
    assert standin.current_revision(server.root, FQRN) == 1


def test_changes_mode_asks_only_about_touched_keys_it_may_publish(server):
    bucket = FakeBucket({"cvmfs/a": b"v1", "cvmfs/b": b"b"})
    _sync.sync(settings(server), server, bucket)
    bucket.objects["cvmfs/a"] = b"v2"
    del bucket.objects["cvmfs/b"]
    result = _sync.sync(settings(server, mode="changes", keys=["cvmfs/b", "cvmfs/a", "cvmfs/../x", "cvmfs/a"]),
                        server, bucket).as_dict()
    assert bucket.heads == [["cvmfs/a", "cvmfs/b"]], "sorted, once each, the refused key never asked about"
    assert bucket.listings == 1, "only the first (state-less) run listed the bucket"
    assert result["mode"] == "changes" and result["updated"] == 1 and result["deleted"] == 1
    assert [(r["key"], r["reason"], r["category"]) for r in result["refused_objects"]] == [
        ("cvmfs/../x", "key has a '..' path segment", "key")]
    assert published(server) == {"a": sha(b"v2")}


def test_check_mode_plans_but_downloads_and_publishes_nothing(server):
    bucket = FakeBucket({"cvmfs/a": b"a"})
    result = _sync.sync(settings(server), server, bucket, check_mode=True)
    assert result.changed and result.as_dict()["added"] == 1 and result.revisions == []
    assert bucket.downloads == [] and published(server) == {}
    assert not state_file(server).exists() and not server.in_transaction(FQRN)


def test_object_gone_before_download_is_neither_published_nor_remembered(server):
    bucket = FakeBucket({"cvmfs/keep": b"keep", "cvmfs/vanishing": b"soon gone"})
    bucket.vanish_on_download.add("cvmfs/vanishing")
    result = _sync.sync(settings(server), server, bucket).as_dict()
    assert result["added"] == 1 and result["objects_downloaded"] == 1
    assert published(server) == {"keep": sha(b"keep")}
    bucket.vanish_on_download.clear()
    del bucket.objects["cvmfs/vanishing"]
    assert not _sync.sync(settings(server), server, bucket).changed


def test_a_failed_download_opens_no_transaction_and_records_nothing(server):
    bucket = FakeBucket({"cvmfs/a": b"a"})
    bucket.fail_download = TransferError("RGW failed to download s3://alice/cvmfs/a: boom", key="cvmfs/a")
    with pytest.raises(TransferError, match="boom"):
        _sync.sync(settings(server), server, bucket)
    assert not server.in_transaction(FQRN) and standin.current_revision(server.root, FQRN) == 0
    assert not state_file(server).exists()
    staging = Path(server.root) / "var/spool/cvmfs-publisher/staging"
    assert list(staging.iterdir()) == [], "the run's staging folder is removed"


def test_a_stale_transaction_is_aborted_first_or_refused(server):
    marker = _transaction.TransactionMarker(settings(server).state_dir, FQRN)
    marker.opening("transaction")  # as a sync killed inside its transaction leaves it
    server.transaction(FQRN)
    marker.opened(server, FQRN)
    with pytest.raises(_sync.SyncError, match="left by an interrupted sync"):
        _sync.sync(settings(server, abort_stale_transaction=False), server, FakeBucket())
    result = _sync.sync(settings(server), server, FakeBucket({"cvmfs/a": b"a"}))
    assert result.stale_transaction_aborted and result.changed and result.revisions == [1]


def test_a_transaction_this_sync_did_not_open_is_refused_and_kept(server):
    server.transaction(FQRN)
    with pytest.raises(_sync.SyncError, match="that this sync did not open"):
        _sync.sync(settings(server), server, FakeBucket({"cvmfs/a": b"a"}))
    assert server.in_transaction(FQRN)


def test_a_missing_repository_is_named_before_the_bucket_is_read(server):
    bucket = FakeBucket({"cvmfs/a": b"a"})
    with pytest.raises(_sync.SyncError, match="repository other.infn.it does not exist on this publisher"):
        _sync.sync(settings(server, repository="other.infn.it"), server, bucket)
    assert bucket.listings == 0


# -- hostile content: per-object outcomes -----------------------------------------------------------------------

def tar(members):
    from tarballs import tarball_bytes
    return tarball_bytes(members, compress=True)


ESCAPING = tar([("sym", "b", "."), ("sym", "c", "b/b/b/../../../../etc/passwd")])
REPORT = ".cvmfs-publisher/report.json"


def test_a_hostile_tarball_is_refused_alone_remembered_reported_and_cleared_by_a_fix(server):
    import json
    bucket = FakeBucket({"cvmfs/evil.tgz": ESCAPING, "cvmfs/good.tgz": tar([("file", "bin/tool", b"tool")]),
                         "cvmfs/plain": b"plain", "cvmfs/a/.wh.gone": b"whiteout"})
    first = _sync.sync(settings(server), server, bucket).as_dict()
    assert published(server) == {"good/bin/tool": sha(b"tool"), "plain": sha(b"plain")}
    refused = {r["key"]: r for r in first["refused_objects"]}
    assert sorted(refused) == ["cvmfs/a/.wh.gone", "cvmfs/evil.tgz"] and first["refused"] == 2
    assert refused["cvmfs/evil.tgz"]["category"] == "tarball"
    assert refused["cvmfs/evil.tgz"]["etag"] == md5(ESCAPING)
    assert "member 'c' is a symbolic link to 'b/b/b/../../../../etc/passwd'" in refused["cvmfs/evil.tgz"]["reason"]
    assert sorted(n["key"] for n in first["refusals"]["new"]) == ["cvmfs/a/.wh.gone", "cvmfs/evil.tgz"]
    report = json.loads(bucket.objects[REPORT])
    assert sorted(r["key"] for r in report["refused"]) == ["cvmfs/a/.wh.gone", "cvmfs/evil.tgz"]
    assert report["repository"] == FQRN and bucket.puts == [REPORT]

    # Unchanged: not downloaded, not judged, not reported again, not new; a full sync succeeds.
    downloads = len(bucket.downloads)
    second = _sync.sync(settings(server), server, bucket).as_dict()
    assert len(bucket.downloads) == downloads and not second["changed"]
    assert second["refused"] == 2 and second["refusals"]["new"] == [] and second["refusals"]["skipped"] == 1
    assert bucket.puts == [REPORT]

    # Fixed: published, the refusal cleared, the report rewritten; the deleted whiteout key is cleared too.
    bucket.objects["cvmfs/evil.tgz"] = tar([("file", "now/fine", b"fine")])
    del bucket.objects["cvmfs/a/.wh.gone"]
    third = _sync.sync(settings(server), server, bucket).as_dict()
    assert sorted(third["refusals"]["cleared"]) == ["cvmfs/a/.wh.gone", "cvmfs/evil.tgz"]
    assert third["refused"] == 0 and published(server)["evil/now/fine"] == sha(b"fine")
    assert json.loads(bucket.objects[REPORT])["refused"] == [] and bucket.puts == [REPORT, REPORT]


def test_a_refused_update_keeps_the_published_version_and_changes_mode_remembers_it(server):
    bucket = FakeBucket({"cvmfs/sw.tgz": tar([("file", "v1", b"one")])})
    _sync.sync(settings(server), server, bucket)
    bucket.objects["cvmfs/sw.tgz"] = ESCAPING
    result = _sync.sync(settings(server, mode="changes", keys=["cvmfs/sw.tgz"]), server, bucket).as_dict()
    assert result["refused"] == 1 and result["updated"] == 0 and published(server) == {"sw/v1": sha(b"one")}
    downloads = len(bucket.downloads)
    again = _sync.sync(settings(server, mode="changes", keys=["cvmfs/sw.tgz"]), server, bucket).as_dict()
    assert len(bucket.downloads) == downloads and again["refused"] == 1 and again["refusals"]["new"] == []


def test_over_a_limit_is_refused_with_the_figure(server):
    members = [("file", "f%d" % i, b"x" * 100) for i in range(30)]
    bucket = FakeBucket({"cvmfs/many.tgz": tar(members), "cvmfs/ok": b"ok"})
    result = _sync.sync(settings(server, tarball_max_members=10), server, bucket).as_dict()
    (refusal,) = result["refused_objects"]
    assert refusal["category"] == "limit" and "more than 10 members" in refusal["reason"]
    assert published(server) == {"ok": sha(b"ok")}


def test_the_report_can_be_moved_or_switched_off_but_never_published(server):
    bucket = FakeBucket({"cvmfs/evil.tgz": ESCAPING})
    _sync.sync(settings(server, report_key=""), server, bucket)
    assert bucket.puts == []
    with pytest.raises(_sync.SyncError, match="under the published prefix"):
        settings(server, report_key="cvmfs/report.json")


def test_no_room_in_staging_is_a_transient_failure_naming_both_figures(tmp_path):
    from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _sync_staging as staging
    with pytest.raises(staging.StagingError, match=r"not enough free space to stage .* MiB free, \d+ MiB needed"):
        staging.check_free_space(str(tmp_path), 1 << 60)
    staging.check_free_space(str(tmp_path), 1024)
