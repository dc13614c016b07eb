"""Refusals remembered per ETag (_refusals): skipped while unchanged, cleared by a fix or a deletion, reported."""
import json

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _refusals as rf
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _sync_plan as sp

PREFIX = "cvmfs/"


def obs(key, etag, size=10):
    return sp.Observation(key, etag, size)


def plan_of(state, observations, complete=True):
    return sp.plan(state, observations, PREFIX, True, complete=complete)


def observed(observations):
    return {o.key: o.etag for o in observations}


def test_a_refused_tarball_is_not_tried_again_until_it_changes():
    refusals = rf.Refusals({"cvmfs/evil.tar": {"etag": "aa", "reason": "member 'c' resolves outside",
                                               "category": "tarball", "since": 100.0}})
    listing = [obs("cvmfs/evil.tar", "aa"), obs("cvmfs/good", "bb")]
    plan = plan_of({}, listing)
    refusals.skip_known(plan)
    refusals.settle(plan, observed(listing), True, 200.0)
    assert [c.key for c in plan.changes] == ["cvmfs/good"]
    assert refusals.skipped == 1 and not refusals.changed
    # A new upload of the same key is judged again: the old refusal is cleared before the new content is judged.
    refusals = rf.Refusals(refusals.entries)
    listing = [obs("cvmfs/evil.tar", "cc")]
    plan = plan_of({}, listing)
    refusals.skip_known(plan)
    refusals.settle(plan, observed(listing), True, 300.0)
    assert [c.key for c in plan.changes] == ["cvmfs/evil.tar"]
    assert refusals.cleared == ["cvmfs/evil.tar"] and refusals.entries == {}


def test_deleting_the_object_clears_its_refusal_in_both_modes():
    for complete, listing in ((True, []), (False, [obs("cvmfs/evil.tar", None)])):
        refusals = rf.Refusals({"cvmfs/evil.tar": {"etag": "aa", "reason": "r", "category": "limit", "since": 1.0}})
        plan = plan_of({}, listing, complete)
        refusals.settle(plan, observed(listing), complete, 2.0)
        assert refusals.cleared == ["cvmfs/evil.tar"]


def test_a_changes_run_keeps_the_refusals_of_keys_it_did_not_touch():
    refusals = rf.Refusals({"cvmfs/evil.tar": {"etag": "aa", "reason": "r", "category": "tarball", "since": 1.0}})
    listing = [obs("cvmfs/other", "bb")]
    plan = plan_of({}, listing, complete=False)
    refusals.settle(plan, observed(listing), False, 2.0)
    assert list(refusals.entries) == ["cvmfs/evil.tar"] and not refusals.changed


def test_key_refusals_are_recorded_once_and_cleared_when_the_object_goes():
    refusals = rf.Refusals()
    listing = [obs("cvmfs/a/.wh.b", "aa"), obs("cvmfs/ok", "bb")]
    plan = plan_of({}, listing)
    refusals.settle(plan, observed(listing), True, 1.0)
    assert [(n["key"], n["category"]) for n in refusals.new] == [("cvmfs/a/.wh.b", "key")]
    again = rf.Refusals(refusals.entries)
    again.settle(plan_of({}, listing), observed(listing), True, 2.0)
    assert not again.changed
    gone = rf.Refusals(refusals.entries)
    gone.settle(plan_of({}, []), {}, True, 3.0)
    assert gone.cleared == ["cvmfs/a/.wh.b"]


def test_result_and_report_list_the_current_refusals():
    refusals = rf.Refusals()
    refusals.refuse("cvmfs/big.tgz", "aa", "tarball expands more than 200 times its size", "limit", 0.0)
    result = refusals.result(limit=10)
    assert result["count"] == 1 and result["new"][0]["key"] == "cvmfs/big.tgz" and result["cleared"] == []
    report = json.loads(rf.report_json("alice.infn.it", "alice", PREFIX, refusals, 60.0))
    assert report["refused"] == [{"key": "cvmfs/big.tgz", "etag": "aa", "kind": "limit",
                                  "since": "1970-01-01T00:00:00Z",
                                  "reason": "tarball expands more than 200 times its size"}]
    assert report["generated"] == "1970-01-01T00:01:00Z" and report["repository"] == "alice.infn.it"


def test_report_key_must_lie_outside_the_published_prefix():
    assert rf.check_report_key(rf.DEFAULT_REPORT_KEY, PREFIX) is None
    assert "under the published prefix" in rf.check_report_key("cvmfs/report.json", PREFIX)


def test_store_round_trip_and_identity(tmp_path):
    store = rf.RefusalStore(str(tmp_path), "alice.infn.it", {"bucket": "alice"})
    refusals, meta = store.load()
    assert refusals.entries == {} and meta == {}
    refusals.refuse("cvmfs/x.tar", "aa", "r", "corrupt", 5.0)
    store.save(refusals, report_digest="d1")
    loaded, meta = store.load()
    assert loaded.entries == refusals.entries and meta == {"report_digest": "d1"}
    other = rf.RefusalStore(str(tmp_path), "alice.infn.it", {"bucket": "elsewhere"})
    assert other.load()[0].entries == {}
