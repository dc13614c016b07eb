"""cvmfs_sync against the local stack: real RGW, the cvmfs_server stand-in, real ansible for the operator's view."""
import base64
import io
import json
import pickle
import stat
import tarfile
import zipfile
from pathlib import Path
from xml.etree import ElementTree

import pytest

from helpers import run_module, run_playbook
from sync_repo import MODULE, Repo, sha, standin, tgz

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _cvmfs, _sync, _sync_publish
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw import listing
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw.objects import BucketObjects


@pytest.fixture
def repo(stack, s3, unique_name, tmp_path):
    return Repo(stack, s3, unique_name, tmp_path)


def test_nested_tree_updates_and_deletes_then_nothing_to_do(repo):
    odd = "cvmfs/with space+plus&amp=\u00fc %2F.txt"
    repo.put_many({"cvmfs/top": b"top", "cvmfs/a/b/c/deep": b"deep", "cvmfs/a/b/sibling": b"sib",
                   "cvmfs/x/only": b"only", "cvmfs/": b"", "cvmfs/emptydir/": b"", "outside/ignored": b"no",
                   odd: b"odd"})
    first = repo.sync(ansible=True)
    assert first["changed"] and first["mode"] == "full" and "state_rebuilt" in first
    assert (first["added"], first["updated"], first["deleted"], first["refused"]) == (5, 0, 0, 0)
    assert first["bytes_downloaded"] == len(b"topdeepsibonlyodd") and first["objects_downloaded"] == 5
    assert first["revision"] == repo.revision() == 1
    assert set(first["durations"]) == {"plan", "download", "transaction"}
    assert repo.files() == {"top": sha(b"top"), "a/b/c/deep": sha(b"deep"), "a/b/sibling": sha(b"sib"),
                            "x/only": sha(b"only"), odd[len("cvmfs/"):]: sha(b"odd")}
    repo.delete(odd)

    repo.put("cvmfs/top", b"top v2")
    repo.delete("cvmfs/a/b/c/deep")
    repo.delete("cvmfs/x/only")
    second = repo.sync(diff=True)
    assert (second["added"], second["updated"], second["deleted"], second["unchanged"]) == (0, 1, 3, 1)
    assert "state_rebuilt" not in second
    assert repo.tree() == {"top": sha(b"top v2"), "a": "dir", "a/b": "dir", "a/b/sibling": sha(b"sib")}, \
        "directories emptied by deletions are removed, the others kept"
    assert "~ /top" in second["diff"]["prepared"] and "- /x/only" in second["diff"]["prepared"]

    third = repo.sync(ansible=True)
    assert not third["changed"] and third["revision"] is None and third["unchanged"] == 2
    assert repo.revision() == 2, "nothing to do opens no transaction"


@pytest.mark.tls
def test_tarball_add_replace_and_remove_through_the_playbook(repo):
    keys = ["cvmfs/sw/v1.tar.gz"]
    repo.put("cvmfs/sw/v1.tar.gz", tgz({"bin/tool": b"tool 1", "share/old": b"old", "lib": ("dir",),
                                        "bin/link": ("symlink", "tool")}))
    run = run_playbook("sync_repository.yml", {"cvmfs_repository": repo.fqrn})
    assert run.returncode == 0, run.stdout[-3000:]
    assert "1 added" in run.stdout
    assert repo.tree() == {"sw": "dir", "sw/v1": "dir", "sw/v1/bin": "dir", "sw/v1/bin/tool": sha(b"tool 1"),
                           "sw/v1/bin/link": "link:tool", "sw/v1/share": "dir", "sw/v1/share/old": sha(b"old"),
                           "sw/v1/lib": "dir"}

    repo.put("cvmfs/sw/v1.tar.gz", tgz({"bin/tool": b"tool 2"}))
    extra = {"cvmfs_repository": repo.fqrn, "cvmfs_sync_mode": "changes", "cvmfs_sync_keys": keys + keys}
    run = run_playbook("sync_repository.yml", extra)
    assert run.returncode == 0, run.stdout[-3000:]
    assert repo.tree() == {"sw": "dir", "sw/v1": "dir", "sw/v1/bin": "dir", "sw/v1/bin/tool": sha(b"tool 2")}, \
        "the new tarball replaces the old content in one revision"

    repo.delete("cvmfs/sw/v1.tar.gz")
    removed = repo.sync(mode="changes", keys=keys)
    assert removed["deleted"] == 1 and repo.tree() == {}
    again = run_playbook("sync_repository.yml", extra)
    assert "changed=0" in again.stdout


def test_the_playbook_builds_the_module_payload_once_for_every_later_run(repo, tmp_path):
    """plugins/action/ + plugin_utils/_ansiballz_cache.py: the second ansible-playbook process reads the payload the
    first one built (same file, untouched), and each process's own temporary folder is still removed."""
    local_tmp = tmp_path / "ansible-tmp"
    env = {"ANSIBLE_LOCAL_TEMP": str(local_tmp)}
    repo.put("cvmfs/one", b"one")
    first = run_playbook("sync_repository.yml", {"cvmfs_repository": repo.fqrn}, env=env)
    assert first.returncode == 0, first.stdout[-3000:]
    assert "1 added" in first.stdout
    lasting = list(local_tmp.glob("infn_cloud.cvmfs_publisher-ansiballz-*"))
    assert len(lasting) == 1, sorted(p.name for p in local_tmp.iterdir())
    payload = lasting[0] / "ansible_collections.infn_cloud.cvmfs_publisher.plugins.modules.cvmfs_sync-ZIP_DEFLATED-none"
    built = payload.stat()
    assert payload.with_name(payload.name + ".bytecode").exists(), "the first run gave the payload its bytecode"
    with payload.open("rb") as handle:
        names = zipfile.ZipFile(io.BytesIO(base64.b64decode(pickle.load(handle).zip_data))).namelist()
    assert "ansible/module_utils/basic.pyc" in names and \
        "ansible_collections/infn_cloud/cvmfs_publisher/plugins/module_utils/_sync.pyc" in names
    repo.put("cvmfs/two", b"two")
    second = run_playbook("sync_repository.yml", {"cvmfs_repository": repo.fqrn}, env=env)
    assert second.returncode == 0, second.stdout[-3000:]
    assert "1 added" in second.stdout and repo.files().keys() == {"one", "two"}
    again = payload.stat()
    assert (again.st_ino, again.st_mtime_ns) == (built.st_ino, built.st_mtime_ns), "the payload was built again"
    assert [p.name for p in local_tmp.iterdir()] == [lasting[0].name], "a process's own folder was left behind"


def test_the_playbook_names_a_missing_repository(repo):
    run = run_playbook("sync_repository.yml", {"cvmfs_sync_mode": "full"})
    assert run.returncode != 0
    assert "set cvmfs_repository=<fqrn>" in run.stdout + run.stderr


def test_more_than_one_page_of_objects_then_changes_mode(repo):
    objects = {"cvmfs/many/%02d/obj-%04d" % (i % 20, i): b"content %d" % i for i in range(1500)}
    repo.put_many(objects)
    first = repo.sync(concurrency=32)
    assert first["added"] == 1500 and first["objects_downloaded"] == 1500
    assert len(first["paths"]["added"]) == 100, "reported paths are capped"
    assert len(repo.files()) == 1500

    repo.put("cvmfs/many/00/obj-0000", b"changed")
    repo.delete("cvmfs/many/01/obj-0001")
    repo.put("cvmfs/many/new", b"new")
    touched = ["cvmfs/many/new", "cvmfs/many/01/obj-0001", "cvmfs/many/00/obj-0000", "cvmfs/many/new"]
    second = repo.sync(mode="changes", keys=touched)
    assert second["mode"] == "changes"
    assert (second["added"], second["updated"], second["deleted"]) == (1, 1, 1)
    assert second["objects_downloaded"] == 2
    files = repo.files()
    assert len(files) == 1500 and files["many/00/obj-0000"] == sha(b"changed") and "many/01/obj-0001" not in files

    third = repo.sync()
    assert not third["changed"] and third["unchanged"] == 1500


def test_hostile_keys_and_tarballs_are_refused_alone_remembered_and_reported_to_the_uploader(repo):
    hostile = ["cvmfs/../escape", "cvmfs/.cvmfs/snapshots/x", "cvmfs/dir/.wh.gone", "cvmfs/a//b",
               "cvmfs/ctl\x01char", "cvmfs/d/.cvmfsautocatalog", "cvmfs/" + "n" * 300]
    for key in hostile:
        repo.put(key, b"evil")
    repo.put("cvmfs/evil.tgz", tgz({"ok": b"fine", "../../outside": b"evil"}))
    repo.put("cvmfs/link.tar.gz", tgz({"etc": ("symlink", "/etc")}))
    repo.put("cvmfs/up.tgz", tgz({"a/b": ("symlink", "../../..")}))
    # The two chains: each link text normalises inside the folder; resolved through b -> . they leave it.
    repo.put("cvmfs/chain.tgz", tgz({"b": ("symlink", "."), "c": ("symlink", "b/" * 8 + "../" * 7 + "etc/passwd")}))
    repo.put("cvmfs/through.tgz", tgz({"b": ("symlink", "."), "d": ("symlink", "b/b/b/b/../../.."), "d/x": b"x"}))
    bomb = io.BytesIO()
    with tarfile.open(fileobj=bomb, mode="w:gz", compresslevel=1) as archive:
        info = tarfile.TarInfo("zeros")
        info.size = 64 << 20
        archive.addfile(info, io.BytesIO(bytes(info.size)))
    repo.put("cvmfs/bomb.tgz", bomb.getvalue())
    repo.put("cvmfs/good", b"good")
    repo.put("cvmfs/fine.tgz", tgz({"bin/tool": b"tool", "latest": ("symlink", "bin")}))
    result = repo.sync(ansible=True)
    reasons = {item["key"]: item["reason"] for item in result["refused_objects"]}
    kinds = {item["key"]: item["category"] for item in result["refused_objects"]}
    listed = {key for key in hostile if key in reasons}
    assert listed, "RGW kept none of the hostile keys"
    assert "cvmfs/" + "n" * 300 in listed and "name longer than 255 bytes" in reasons["cvmfs/" + "n" * 300]
    assert "nothing of it published" in reasons["cvmfs/evil.tgz"]
    assert "member '../../outside' has a '..' path segment" in reasons["cvmfs/evil.tgz"]
    assert "member 'etc' is a symbolic link to the absolute path '/etc'" in reasons["cvmfs/link.tar.gz"]
    assert "resolves outside the tarball's folder" in reasons["cvmfs/up.tgz"]
    assert "member 'c' is a symbolic link to 'b/b/b/b/b/b/b/b/../../../../../../../etc/passwd', which resolves " \
           "outside" in reasons["cvmfs/chain.tgz"]
    assert "member 'd' is a symbolic link to 'b/b/b/b/../../..'" in reasons["cvmfs/through.tgz"]
    assert "expands more than 200 times its size" in reasons["cvmfs/bomb.tgz"] and kinds["cvmfs/bomb.tgz"] == "limit"
    assert result["refused"] == len(reasons) and result["added"] == 2 and result["failed"] is False
    assert repo.tree() == {"good": sha(b"good"), "fine": "dir", "fine/bin": "dir", "fine/bin/tool": sha(b"tool"),
                           "fine/latest": "link:bin"}
    assert not (Path(repo.root) / "cvmfs" / "escape").exists()
    report = json.loads(repo.s3.get_object(Bucket=repo.short, Key=".cvmfs-publisher/report.json")["Body"].read())
    assert {item["key"]: item["reason"] for item in report["refused"]} == reasons
    # Remembered per ETag: the next full sync downloads nothing and succeeds; fixing one object clears it.
    again = repo.sync()
    assert not again["changed"] and again["refused"] == result["refused"] and again["objects_downloaded"] == 0
    assert again["refusals"]["new"] == [] and again["refusals"]["skipped"] == 6  # the six tarballs
    repo.put("cvmfs/chain.tgz", tgz({"c": b"now a file"}))
    repo.delete("cvmfs/bomb.tgz")
    fixed = repo.sync()
    assert sorted(fixed["refusals"]["cleared"]) == ["cvmfs/bomb.tgz", "cvmfs/chain.tgz"]
    assert repo.files()["chain/c"] == sha(b"now a file") and fixed["refused"] == result["refused"] - 2
    report = json.loads(repo.s3.get_object(Bucket=repo.short, Key=".cvmfs-publisher/report.json")["Body"].read())
    assert "cvmfs/chain.tgz" not in {item["key"] for item in report["refused"]}


def test_conflicting_paths_are_refused_not_fatal(repo):
    repo.put("cvmfs/a", b"file a")
    repo.sync()
    repo.put("cvmfs/a/b", b"under a file")
    result = repo.sync(mode="changes", keys=["cvmfs/a/b"])
    assert [(r["key"], r["reason"], r["category"]) for r in result["refused_objects"]] == [
        ("cvmfs/a/b", "path 'a/b' conflicts with object 'cvmfs/a'", "conflict")]
    assert repo.files() == {"a": sha(b"file a")}


def test_parallel_listing_by_top_level_folder_sees_exactly_what_one_sequence_sees(repo, monkeypatch):
    """_rgw/objects.py lists a prefix's top-level folders in parallel: the same observations as the page-by-page
    listing, with objects right under the prefix, a folder of more than one page, nested folders, a "//" key and
    characters that need URL encoding; and nothing outside the prefix. Every page RGW answers without folders is
    read by _rgw/listing.py's fast reader (the form it expects is RGW's real one), exactly as ElementTree reads it."""
    answers = []
    read_page = listing.read_page
    monkeypatch.setattr(listing, "read_page", lambda body: answers.append(body) or read_page(body))
    objects = {"cvmfs/big/f%04d" % i: b"%d" % i for i in range(1100)}  # two pages in one folder
    objects.update({"cvmfs/top": b"top", "cvmfs/a/b/c/deep": b"deep", "cvmfs/a/b/d": b"d", "cvmfs//double": b"2",
                    "cvmfs/sp ace+plus/\u00fc%2F": b"odd", "cvmfs/emptydir/": b"", "cvmfsx/not-in": b"no",
                    "outside/x": b"no"})
    repo.put_many(objects)
    params = repo.params()

    def observed(concurrency):
        reader = BucketObjects.from_params(params, repo.short, concurrency)
        return sorted((obs.key, obs.etag, obs.size) for obs in reader.list("cvmfs/"))

    sequential = observed(1)
    assert [key for key, _, _ in sequential] == sorted(k for k in objects if k.startswith("cvmfs/"))
    assert observed(8) == sequential
    assert observed(2) == sequential
    plain = [body for body in answers if b"<CommonPrefixes>" not in body and b"<Contents>" in body]
    assert len(plain) >= 3 and len(answers) > len(plain), "pages of keys, and delimiter pages"
    for body in plain:
        fast = listing._read_plain(body.decode("utf-8"))
        assert fast is not None, "RGW's answer did not take the fast path: %r" % body[:600]
        tree = listing._read_tree(ElementTree.fromstring(body))
        assert [(o.key, o.etag, o.size) for o in fast.observations] == [(o.key, o.etag, o.size)
                                                                         for o in tree.observations]
        assert (fast.truncated, fast.token) == (tree.truncated, tree.token)


def test_object_deleted_between_listing_and_download(repo, monkeypatch):
    repo.put_many({"cvmfs/keep": b"keep", "cvmfs/vanishing": b"soon gone"})

    class DeletedFirst(BucketObjects):
        def download(self, change, folder):
            if change.key == "cvmfs/vanishing":
                repo.delete(change.key)
            return super().download(change, folder)

    params = repo.params()
    settings = _sync.SyncSettings.from_params(params)
    objects = DeletedFirst.from_params(params, settings.bucket, settings.concurrency)
    result = _sync.sync(settings, _cvmfs.CvmfsServer.from_params(params), objects).as_dict()
    assert result["changed"] and result["objects_downloaded"] == 1 and result["added"] == 1
    assert repo.files() == {"keep": sha(b"keep")}
    assert not repo.sync()["changed"], "the state does not remember the vanished object"


def test_incomplete_multipart_upload_event_is_harmless(repo):
    repo.s3.create_multipart_upload(Bucket=repo.short, Key="cvmfs/big")
    result = repo.sync(mode="changes", keys=["cvmfs/big"])
    assert not result["changed"] and result["added"] == 0 and repo.tree() == {}


def publish_fails_wrapper(repo, tmp_path):
    """A cvmfs_server that fails `publish` (exit 1) after the transaction was opened and written to."""
    wrapper = tmp_path / "cvmfs_server_failing_publish"
    wrapper.write_text('#!/bin/sh\nif [ "$1" = publish ]; then echo "Synchronization failed (injected)" >&2; '
                       'exit 1; fi\nexec %s "$@"\n' % repo.bin)
    wrapper.chmod(0o755)
    return str(wrapper)


def test_failed_publish_aborts_and_keeps_the_previous_revision(repo, tmp_path):
    repo.put("cvmfs/stable", b"v1")
    repo.sync()
    before, state_before = repo.tree(), repo.state_file.read_text()
    repo.put("cvmfs/stable", b"v2")
    repo.put("cvmfs/new/file", b"new")
    rc, result = run_module(MODULE, repo.args(cvmfs_server_bin=publish_fails_wrapper(repo, tmp_path)))
    assert rc != 0 and result["failed"]
    assert "failed while publishing" in result["msg"] and "Synchronization failed (injected)" in result["msg"]
    assert "transaction was aborted" in result["msg"]
    assert not repo.in_transaction() and repo.tree() == before and repo.revision() == 1
    assert repo.state_file.read_text() == state_before
    assert not (Path(repo.root) / "cvmfs" / repo.fqrn / "new").exists(), "abort put back the published tree"
    recovered = repo.sync()
    assert recovered["updated"] == 1 and recovered["added"] == 1
    assert repo.files() == {"stable": sha(b"v2"), "new/file": sha(b"new")}


def test_failure_while_applying_names_the_object(repo, monkeypatch):
    repo.put_many({"cvmfs/one": b"1", "cvmfs/two": b"2"})
    real_move = _sync_publish._move

    def move(source, target, is_tree):
        if target.endswith("/two"):
            raise OSError(28, "No space left on device")
        return real_move(source, target, is_tree)

    monkeypatch.setattr(_sync_publish, "_move", move)
    with pytest.raises(_sync.SyncError) as failure:
        _sync.run(repo.params())
    assert "applying cvmfs/two (/two): No space left on device" in failure.value.msg
    assert failure.value.details["key"] == "cvmfs/two"
    assert not repo.in_transaction() and repo.tree() == {} and repo.revision() == 0
    assert not repo.state_file.exists()


def test_check_mode_predicts_and_changes_nothing(repo):
    repo.put_many({"cvmfs/a": b"a", "cvmfs/t.tgz": tgz({"f": b"f"}), "cvmfs/../bad": b"x"})
    predicted = repo.sync(check=True, diff=True)
    assert predicted["changed"] and predicted["added"] == 2 and predicted["refused"] == 1
    assert predicted["bytes_downloaded"] == 0 and predicted["paths"]["added"] == ["a", "t"]
    assert "+ /a" in predicted["diff"]["prepared"]
    assert repo.revision() == 0 and repo.tree() == {} and not repo.state_file.exists()
    done = repo.sync()
    assert (done["added"], done["refused"]) == (predicted["added"], predicted["refused"])
    assert not repo.sync(check=True, ansible=True)["changed"]


def test_lost_or_corrupt_state_costs_a_recheck_not_a_wrong_repository(repo):
    repo.put_many({"cvmfs/a": b"a", "cvmfs/d/b": b"b", "cvmfs/t.tgz": tgz({"f": b"f"})})
    repo.sync()
    repo.state_file.write_text('{"version": 1, "objects": {"cvmfs/a": ["bogus"')
    repo.put("cvmfs/d/b", b"b changed")
    repo.delete("cvmfs/a")
    result = repo.sync(mode="changes", keys=["cvmfs/d/b"])
    assert result["mode"] == "full" and "not valid JSON" in result["state_rebuilt"]
    assert repo.files() == {"d/b": sha(b"b changed"), "t/f": sha(b"f")}, "the deletion is found without state"
    assert not repo.sync()["changed"]

    repo.state_file.unlink()
    rebuilt = repo.sync()
    assert rebuilt["unchanged"] == 1 and rebuilt["updated"] == 0, "verified by size and MD5, not re-downloaded"
    assert rebuilt["added"] == 1, "a tarball cannot be verified without state: re-ingested"
    assert repo.files() == {"d/b": sha(b"b changed"), "t/f": sha(b"f")}


def test_files_are_world_readable_and_staging_is_cleaned_up(repo):
    staging = Path(repo.root) / "var/spool/cvmfs-publisher/staging"
    leftover = staging / (repo.fqrn + "@killed-run")
    leftover.mkdir(parents=True)
    (leftover / "obj-partial").write_bytes(b"half a download")
    repo.put("cvmfs/r", b"r")
    repo.sync()
    mode = standin.published_manifest(repo.root, repo.fqrn)["r"]["mode"]
    assert mode & stat.S_IROTH, "CVMFS clients need world-readable files (%o)" % mode
    assert not [p for p in staging.iterdir() if p.name.startswith(repo.fqrn + "@")]
