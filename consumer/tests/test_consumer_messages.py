import json
from pathlib import Path

import pytest

from cvmfs_publisher_consumer import contract
from cvmfs_publisher_consumer.messages import (MessageError, ProvisionRequest, check_key, parse_provision,
                                               parse_s3_event, touched_keys)

EXAMPLES = Path("/work/shared/examples")
HERE_EXAMPLES = Path(__file__).parent / "data"


def s3_event(key, bucket, name, size, source):
    record = {"eventVersion": "2.2", "eventSource": source, "eventName": name,
              "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": size}}}
    return json.dumps({"Records": [record]}).encode()


def rgw_event(key="cvmfs/a/b.txt", bucket="alice", name="ObjectCreated:Put", size=12):
    return s3_event(key, bucket, name, size, "ceph:s3")


def aws_event(key, bucket="alice", name="s3:ObjectRemoved:Delete", size="7"):
    return s3_event(key, bucket, name, size, "aws:s3")


# -- provisioning ------------------------------------------------------------------------------------------

def test_plain_text_personal():
    request = parse_provision(b"alice,0f3c-sub,alice.infn.it,P\n")
    assert request == ProvisionRequest("alice.infn.it", subject="0f3c-sub", owner="alice", form="csv")
    assert contract.provision(request) == ("provision_playbook", {"cvmfs_repository": "alice.infn.it",
                                                                 "cvmfs_subject": "0f3c-sub"})


def test_plain_text_group_uses_the_short_name_as_group():
    request = parse_provision(b"bob,sub,physics.infn.it,G")
    assert contract.provision(request)[1] == {"cvmfs_repository": "physics.infn.it", "cvmfs_group": "physics"}


def test_json_forms():
    personal = parse_provision(json.dumps({"version": 1, "repository": "alice.infn.it", "owner": "alice",
                                           "subject": "s-1", "kind": "personal"}).encode())
    assert contract.provision(personal)[1] == {"cvmfs_repository": "alice.infn.it", "cvmfs_subject": "s-1"}
    group = parse_provision(json.dumps({"version": 1, "repository": "lab.infn.it", "kind": "group",
                                        "group": "lab-admins"}).encode())
    assert contract.provision(group)[1] == {"cvmfs_repository": "lab.infn.it", "cvmfs_group": "lab-admins"}


@pytest.mark.parametrize("body, reason", [
    (b"alice,sub,alice.infn.it", "4 comma-separated fields"),
    (b"alice,sub,alice.infn.it,X", "must be P (personal) or G (group)"),
    (b"alice,sub,../../etc.infn.it,P", "invalid repository name"),
    (b"alice,sub,Alice.infn.it,P", "short name 'Alice' must also be a valid bucket, topic and queue name"),
    (b"alice,sub/../x,alice.infn.it,P", "invalid subject"),
    (b"alice,sub,alice,P", "invalid repository name"),
    (b"", "message is empty"),
    (b"\xff\xfe", "not UTF-8"),
    (b'{"version": 1, "repository": "alice.infn.it", "kind": "personal"', "not valid JSON"),
    (b'{"version": 2, "repository": "alice.infn.it"}', "unsupported version 2"),
    (b'{"version": 1, "repository": "alice.infn.it", "kind": "team"}', "kind must be"),
    (b'{"version": 1, "repository": "alice.infn.it", "kind": "personal", "subject": "s", "x": 1}', "unknown field 'x'"),
    (b'{"version": 1, "repository": "alice.infn.it", "kind": "personal"}', "invalid subject None"),
    (b'[1, 2]', "4 comma-separated fields"),
])
def test_bad_provisioning_messages_say_why(body, reason):
    with pytest.raises(MessageError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        parse_provision(body)


def test_domain_restriction():
    assert parse_provision(b"a,s,alice.infn.it,P", domain="infn.it").repository == "alice.infn.it"
    with pytest.raises(MessageError, match="not in this publisher's domain 'infn.it'"):
        parse_provision(b"a,s,alice.example.org,P", domain="infn.it")


# -- S3 events ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="shared examples not present")
@pytest.mark.parametrize("name, expected", [("rgw-event-put.json", "ObjectCreated:Put"),
                                            ("rgw-event-delete.json", "ObjectRemoved:Delete")])
def test_real_rgw_events(name, expected):
    [event] = parse_s3_event((EXAMPLES / name).read_bytes())
    assert (event.bucket, event.key, event.name, event.size) == (
        "notif-cvmfs-events", "cvmfs/data/ab/cdef0123", expected, 1234)


def test_rgw_keys_are_raw_aws_keys_are_url_encoded():
    [rgw] = parse_s3_event(rgw_event(key="cvmfs/a+b%20c.txt"))
    assert rgw.key == "cvmfs/a+b%20c.txt"
    [aws] = parse_s3_event(aws_event(key="cvmfs/my+file%2Bx.txt"))
    assert (aws.key, aws.name, aws.size) == ("cvmfs/my file+x.txt", "ObjectRemoved:Delete", 7)


def test_aws_test_event_is_nothing():
    assert parse_s3_event(b'{"Service":"Amazon S3","Event":"s3:TestEvent","Bucket":"alice"}') == []


@pytest.mark.parametrize("body, reason", [
    (b"not json", "not valid JSON"),
    (b"[]", "JSON object with a Records list"),
    (b'{"Records": []}', "no Records list"),
    (b'{"Records": [{"eventName": "ObjectCreated:Put"}]}', "s3.bucket.name missing"),
    (b'{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "a"}}}]}', "s3.object.key missing"),
    (b'{"Records": [{"s3": {}}]}', "eventName missing"),
    (b'{"Records": ["x"]}', r"Records\[0\]: expected an object"),
    (s3_event("k", "a", "ObjectCreated:Put", "big", "ceph:s3"), "size 'big' is not a number"),
])
def test_bad_events_say_why(body, reason):
    with pytest.raises(MessageError, match=reason):
        parse_s3_event(body)


@pytest.mark.parametrize("key, reason", [
    ("cvmfs/../etc/passwd", "'..' path segment"),
    ("cvmfs/a/./b", "'.' path segment"),
    ("cvmfs//etc/passwd", "absolute path"),
    ("cvmfs/a//b", "empty path segment"),
    ("cvmfs/dir/", "empty path segment"),
    ("cvmfs/.cvmfs/snapshots", ".cvmfs at the top"),
    ("cvmfs/a/.wh.b", "whiteout"),
    ("cvmfs/a/.cvmfsautocatalog", "which CVMFS manages"),
    ("cvmfs/a\nb", "control characters"),
    ("cvmfs/a\x85b", "control characters"),
    ("cvmfs/a\ud800b", "not valid UTF-8"),
    ("cvmfs/" + "a" * 300, "name longer than 255 bytes"),
    ("cvmfs/" + "a" * 1100, "longer than 1024 bytes"),
    ("other/a", "outside the prefix"),
    ("cvmfs/", "the prefix itself"),
])
def test_hostile_keys(key, reason):
    with pytest.raises(MessageError, match=reason):
        check_key(key, "cvmfs/")


def test_fine_keys():
    assert check_key("cvmfs/a/b c/.cvmfscatalog", "cvmfs/") == "a/b c/.cvmfscatalog"
    assert check_key("cvmfs/sub/.cvmfs", "cvmfs/") == "sub/.cvmfs"
    assert check_key("cvmfs/" + "é" * 127, "cvmfs/") == "é" * 127


def test_touched_keys_filters_and_deduplicates():
    events = (parse_s3_event(rgw_event("cvmfs/a")) + parse_s3_event(rgw_event("cvmfs/a", name="ObjectRemoved:Delete"))
              + parse_s3_event(rgw_event("other/x")) + parse_s3_event(rgw_event("cvmfs/b", bucket="bob"))
              + parse_s3_event(rgw_event("cvmfs/")) + parse_s3_event(rgw_event("cvmfs/c", name="ObjectSynced:Create")))
    touches = touched_keys(events, bucket="alice", prefix="cvmfs/", known_buckets={"alice", "bob"})
    assert touches.keys == ("cvmfs/a",)
    assert len(touches.ignored) == 4
    assert any("outside the prefix" in reason for reason in touches.ignored)
    assert any("another repository's bucket 'bob'" in reason for reason in touches.ignored)


def test_each_record_is_judged_on_its_own():
    """A hostile key, an unknown bucket and a malformed record do not drop the good records beside them."""
    body = json.dumps({"Records": [
        json.loads(rgw_event("cvmfs/good1"))["Records"][0],
        json.loads(rgw_event("cvmfs/a/../../x"))["Records"][0],
        json.loads(rgw_event("cvmfs/x", bucket="mallory"))["Records"][0],
        {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "alice"}}},
        json.loads(rgw_event("cvmfs/good2"))["Records"][0],
    ]}).encode()
    problems = []
    events = parse_s3_event(body, problems)
    assert problems == ["Records[3]: s3.object.key missing"]
    touches = touched_keys(events, "alice", "cvmfs/", {"alice"})
    assert touches.keys == ("cvmfs/good1", "cvmfs/good2")
    assert touches.refused == (("cvmfs/a/../../x", "object key 'cvmfs/a/../../x' has a '..' path segment"),)
    assert touches.ignored == ("event for unknown bucket 'mallory', not 'alice'",)
    with pytest.raises(MessageError, match=r"Records\[3\]: s3.object.key missing"):
        parse_s3_event(body)


def test_sync_contract_passes_keys_only_in_changes_mode():
    assert contract.sync("alice.infn.it", "changes", ("cvmfs/a",)) == (
        "sync_playbook", {"cvmfs_repository": "alice.infn.it", "cvmfs_sync_mode": "changes",
                          "cvmfs_sync_keys": ["cvmfs/a"]})
    assert contract.sync("alice.infn.it", "full", ("cvmfs/a",))[1] == {"cvmfs_repository": "alice.infn.it",
                                                                       "cvmfs_sync_mode": "full"}


def test_the_playbooks_declare_the_extravars_the_contract_passes():
    import yaml
    root = Path(__file__).resolve().parents[2]
    role_options = yaml.safe_load((root / "roles/repository/meta/argument_specs.yml").read_text())
    declared = set(role_options["argument_specs"]["main"]["options"])
    _, personal = contract.provision(ProvisionRequest("a.infn.it", subject="s"))
    _, group = contract.provision(ProvisionRequest("a.infn.it", group="g"))
    assert set(personal) | set(group) <= declared, "provision_repository.yml applies the repository role"
    play = yaml.safe_load((root / "playbooks/sync_repository.yml").read_text())[0]
    used = " ".join(str(value) for value in play["tasks"][0]["infn_cloud.cvmfs_publisher.cvmfs_sync"].values())
    for name in contract.sync("a.infn.it", "changes", ["k"])[1]:
        assert name in used, "sync_repository.yml's sync task uses %s" % name
    assert "cvmfs_repository | mandatory(" in used, "a missing repository is named before anything runs"
