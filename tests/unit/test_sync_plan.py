"""The sync engine's pure half: key rules, tar member rules, planning, state file."""

import json

import pytest

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _sync_plan as sp

PREFIX = "cvmfs/"
MD5 = "0123456789abcdef0123456789abcdef"
OTHER_MD5 = "fedcba9876543210fedcba9876543210"


def obs(key, etag=MD5, size=4):
    return sp.Observation(key, etag, size)


def gone(key):
    return sp.Observation(key, None, None)


def ops(plan):
    return sorted((c.op, c.key, c.kind, c.path) for c in plan.changes)


def refused_keys(plan):
    return sorted(r["key"] for r in plan.refused)


# --- keys ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, path", [
    ("cvmfs/a", "a"),
    ("cvmfs/sw/v1/bin/tool", "sw/v1/bin/tool"),
    ("cvmfs/with space+plus&amp=ü.txt", "with space+plus&amp=ü.txt"),
    ("cvmfs/.cvmfsdirtab", ".cvmfsdirtab"),
    ("cvmfs/sub/.cvmfscatalog", "sub/.cvmfscatalog"),
    ("cvmfs/sub/.cvmfs", "sub/.cvmfs"),
    ("cvmfs/a..b", "a..b"),
])
def test_valid_keys_map_under_the_repository(key, path):
    assert sp.object_path(key, PREFIX) == path


@pytest.mark.parametrize("key, reason", [
    ("other/a", "outside the prefix"),
    ("cvmfsa", "outside the prefix"),
    ("cvmfs/../etc/passwd", "'..' path segment"),
    ("cvmfs/a/../../b", "'..' path segment"),
    ("cvmfs/./a", "'.' path segment"),
    ("cvmfs//etc/passwd", "absolute"),
    ("cvmfs/a//b", "empty path segment"),
    ("cvmfs/a\nb", "control character"),
    ("cvmfs/a\x7fb", "control character"),
    ("cvmfs/a\tb", "control character"),
    ("cvmfs/.cvmfs/snapshots/x", "reserved top-level directory '.cvmfs'"),
    ("cvmfs/.cvmfs", "reserved top-level directory '.cvmfs'"),
    ("cvmfs/dir/.wh.file", "overlay whiteout"),
    ("cvmfs/.wh..wh..opq", "overlay whiteout"),
    ("cvmfs/d/.cvmfsautocatalog", "managed by CVMFS"),
    ("cvmfs/" + "x" * 256, "longer than 255 bytes"),
])
def test_hostile_keys_are_refused_with_a_reason(key, reason):
    with pytest.raises(sp.Refused, match=reason.replace(".", r"\.").replace("(", r"\(")):
        sp.object_path(key, PREFIX)


@pytest.mark.parametrize("path, target", [
    ("sw.tar", "sw"), ("sw/v1.tar.gz", "sw/v1"), ("a/b.tgz", "a/b"),
    ("a.gz", None), ("a.tar.bz2", None), ("a/.tar", None), (".tgz", None),
])
def test_tarball_targets(path, target):
    assert sp.tarball_target(path) == target


def test_classify_honours_the_tarball_switch():
    assert sp.classify("cvmfs/sw/v1.tgz", PREFIX, True) == (sp.TARBALL, "sw/v1")
    assert sp.classify("cvmfs/sw/v1.tgz", PREFIX, False) == (sp.FILE, "sw/v1.tgz")


def test_directory_markers_are_recognised():
    assert sp.is_directory_marker("cvmfs/", PREFIX)
    assert sp.is_directory_marker("cvmfs/dir/", PREFIX)
    assert not sp.is_directory_marker("cvmfs/dir/file", PREFIX)
    assert not sp.is_directory_marker("cvmfs//", PREFIX)


def test_etags():
    assert sp.normalize_etag('"0123456789ABCDEF0123456789ABCDEF"') == MD5
    assert sp.etag_is_md5('"%s"' % MD5)
    assert not sp.etag_is_md5(MD5 + "-3")


# --- planning -----------------------------------------------------------------------------------------------

def test_full_plan_from_nothing_adds_everything_and_skips_markers():
    plan = sp.plan({}, [obs("cvmfs/"), obs("cvmfs/a"), obs("cvmfs/d/"), obs("cvmfs/d/b"), obs("cvmfs/t.tgz")],
                   PREFIX, tarballs=True, complete=True)
    assert ops(plan) == [("add", "cvmfs/a", "file", "a"), ("add", "cvmfs/d/b", "file", "d/b"),
                         ("add", "cvmfs/t.tgz", "tarball", "t")]
    assert plan.unchanged == 0 and plan.refused == []


def test_full_plan_detects_updates_deletions_and_unchanged():
    old = {"cvmfs/same": (MD5, 4, "file"), "cvmfs/etag": (MD5, 4, "file"), "cvmfs/size": (MD5, 4, "file"),
           "cvmfs/gone": (MD5, 4, "file"), "cvmfs/old.tar": (MD5, 4, "tarball")}
    plan = sp.plan(old, [obs("cvmfs/same"), obs("cvmfs/etag", OTHER_MD5), obs("cvmfs/size", MD5, 5)],
                   PREFIX, True, complete=True)
    assert ops(plan) == [("delete", "cvmfs/gone", "file", "gone"), ("delete", "cvmfs/old.tar", "tarball", "old"),
                         ("update", "cvmfs/etag", "file", "etag"), ("update", "cvmfs/size", "file", "size")]
    assert plan.unchanged == 1
    new = plan.new_state(old)
    assert set(new) == {"cvmfs/same", "cvmfs/etag", "cvmfs/size"}
    assert new["cvmfs/etag"] == (OTHER_MD5, 4, "file")


def test_changes_plan_only_touches_the_given_keys():
    old = {"cvmfs/a": (MD5, 4, "file"), "cvmfs/b": (MD5, 4, "file")}
    plan = sp.plan(old, [gone("cvmfs/a")], PREFIX, True, complete=False)
    assert ops(plan) == [("delete", "cvmfs/a", "file", "a")]
    assert plan.new_state(old) == {"cvmfs/b": (MD5, 4, "file")}


def test_changes_plan_ignores_order_and_duplicates_and_absent_objects():
    old = {"cvmfs/a": (MD5, 4, "file")}
    events = [obs("cvmfs/n"), gone("cvmfs/never-completed"), obs("cvmfs/n"), obs("cvmfs/a")]
    first = sp.plan(old, events, PREFIX, True, complete=False)
    second = sp.plan(old, list(reversed(events)), PREFIX, True, complete=False)
    assert ops(first) == ops(second) == [("add", "cvmfs/n", "file", "n")]
    assert first.unchanged == 1


def test_hostile_keys_are_refused_not_planned():
    plan = sp.plan({}, [obs("cvmfs/../x"), obs("elsewhere"), obs("cvmfs/ok")], PREFIX, True, complete=True)
    assert ops(plan) == [("add", "cvmfs/ok", "file", "ok")]
    assert refused_keys(plan) == ["cvmfs/../x", "elsewhere"]
    assert all(r["reason"] for r in plan.refused)


def test_switching_tarball_mode_replaces_the_entry():
    old = {"cvmfs/t.tgz": (MD5, 4, "tarball")}
    plan = sp.plan(old, [obs("cvmfs/t.tgz")], PREFIX, tarballs=False, complete=True)
    assert ops(plan) == [("add", "cvmfs/t.tgz", "file", "t.tgz"), ("delete", "cvmfs/t.tgz", "tarball", "t")]
    assert plan.new_state(old) == {"cvmfs/t.tgz": (MD5, 4, "file")}


def test_a_new_file_cannot_sit_where_a_published_directory_is():
    old = {"cvmfs/a/b": (MD5, 4, "file")}
    plan = sp.plan(old, [obs("cvmfs/a")], PREFIX, True, complete=False)
    assert ops(plan) == []
    assert plan.refused == [{"key": "cvmfs/a", "reason": "path 'a' is a directory holding other objects",
                            "category": "conflict"}]


def test_a_new_object_cannot_go_under_a_published_file_or_tarball_directory():
    old = {"cvmfs/a": (MD5, 4, "file"), "cvmfs/t.tar": (MD5, 4, "tarball")}
    plan = sp.plan(old, [obs("cvmfs/a/b"), obs("cvmfs/t/x"), obs("cvmfs/t.tgz")], PREFIX, True, complete=False)
    assert ops(plan) == []
    reasons = {r["key"]: r["reason"] for r in plan.refused}
    assert reasons == {"cvmfs/a/b": "path 'a/b' conflicts with object 'cvmfs/a'",
                       "cvmfs/t/x": "path 't/x' conflicts with object 'cvmfs/t.tar'",
                       "cvmfs/t.tgz": "path 't' conflicts with object 'cvmfs/t.tar'"}


def test_conflicts_among_new_objects_are_decided_by_key_order_not_event_order():
    events = [obs("cvmfs/a/b"), obs("cvmfs/a")]
    for order in (events, list(reversed(events))):
        plan = sp.plan({}, order, PREFIX, True, complete=True)
        assert ops(plan) == [("add", "cvmfs/a", "file", "a")]
        assert refused_keys(plan) == ["cvmfs/a/b"]


def test_deleting_a_file_frees_its_path_for_a_directory_in_the_same_run():
    old = {"cvmfs/a": (MD5, 4, "file")}
    plan = sp.plan(old, [gone("cvmfs/a"), obs("cvmfs/a/b")], PREFIX, True, complete=False)
    assert ops(plan) == [("add", "cvmfs/a/b", "file", "a/b"), ("delete", "cvmfs/a", "file", "a")]
    assert plan.changes[0].op == "delete", "deletions are applied first"


def test_a_refused_update_keeps_the_published_version_in_state():
    old = {"cvmfs/a": (MD5, 4, "file"), "cvmfs/a.tar": (MD5, 4, "file")}
    # Turning tarballs on makes a.tar want directory 'a', taken by the file 'a'.
    plan = sp.plan(old, [obs("cvmfs/a"), obs("cvmfs/a.tar")], PREFIX, tarballs=True, complete=True)
    assert refused_keys(plan) == ["cvmfs/a.tar"]
    assert ops(plan) == [("delete", "cvmfs/a.tar", "file", "a.tar")]


# --- state file ---------------------------------------------------------------------------------------------

IDENTITY = sp.state_identity("alice.infn.it", "alice", PREFIX, True)


def test_state_round_trip():
    state = {"cvmfs/a \"q\"": (MD5, 4, "file"), "cvmfs/t.tgz": (MD5 + "-2", 10 ** 12, "tarball")}
    text = sp.dump_state(state, IDENTITY)
    assert sp.load_state(text, IDENTITY) == (state, None)
    assert sp.load_state(sp.dump_state({}, IDENTITY), IDENTITY) == ({}, None)


@pytest.mark.parametrize("text, reason", [
    ("", "not valid JSON"),
    ('{"version": 1, "identity": {}, "objec', "not valid JSON"),
    ('{"version": 99}', "unknown format version"),
    ('[]', "unknown format version"),
    (json.dumps({"version": 1, "identity": sp.state_identity("bob.infn.it", "bob", PREFIX, True), "objects": {}}),
     "another repository"),
    (json.dumps({"version": 1, "identity": IDENTITY, "objects": {"k": ["e", "4", "file"]}}), "malformed entry"),
    (json.dumps({"version": 1, "identity": IDENTITY, "objects": {"k": ["e", 4, "pipe"]}}), "malformed entry"),
])
def test_untrusted_state_is_rejected_with_a_reason(text, reason):
    state, why = sp.load_state(text, IDENTITY)
    assert state is None and reason in why


def test_a_state_file_that_is_not_utf8_is_untrusted_not_a_crash(tmp_path):
    from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._sync_state import StateStore
    store = StateStore(str(tmp_path), "alice.infn.it", IDENTITY)
    store.save({"cvmfs/a": (MD5, 4, "file")})
    assert store.load() == ({"cvmfs/a": (MD5, 4, "file")}, None)
    with open(store.path, "ab") as handle:
        handle.write(b"\xff\xfe")
    state, why = store.load()
    assert state is None and "is not UTF-8 text" in why and store.path in why


def test_unchanged_keys_are_not_judged_again_but_a_changed_kind_still_is(monkeypatch):
    """A no-change reconcile does not judge 100,000 keys again: an unchanged object of the same kind is counted
    unchanged without classify(); one whose kind would change (tarball option switched) goes through it."""
    old = {"cvmfs/a": (MD5, 4, "file"), "cvmfs/t.tgz": (MD5, 4, "file")}
    judged = []
    real = sp.classify
    monkeypatch.setattr(sp, "classify", lambda key, prefix, tarballs: judged.append(key) or real(key, prefix,
                                                                                                   tarballs))
    plan = sp.plan(old, [obs("cvmfs/a"), obs("cvmfs/t.tgz")], PREFIX, tarballs=False, complete=True)
    assert plan.unchanged == 2 and not plan.changes and judged == []
    plan = sp.plan(old, [obs("cvmfs/a"), obs("cvmfs/t.tgz")], PREFIX, tarballs=True, complete=True)
    assert judged == ["cvmfs/t.tgz"] and plan.unchanged == 1
    assert [c.op for c in plan.changes] == ["delete", "add"]
