"""Tenants kept apart on the real stack: alice's and bob's S3 keys, events, repositories and Vault paths.

The stack has the publisher's S3 identity (it owns the repositories' buckets, as RGW 16.2 requires of whoever
manages a bucket's notification) and two users, alice and bob, each granted devstack/rights.py's
``tenant_bucket_policy`` on their own bucket only. Refusals are asserted on RGW's, RabbitMQ's and the modules' words.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import boto3
import hvac
import pika
import pytest
from botocore.exceptions import ClientError

from helpers import REPO_ROOT, amqp_parameters, aws_kwargs, consumer_e2e, run_module

sys.path.insert(0, str(REPO_ROOT / "devstack"))
import rights  # noqa: E402  (the stack's own rights: one place for the policies)

RGW = "infn_cloud.cvmfs_publisher.rgw_bucket_notification"
DELIVERY_WAIT = 60  # seconds: a bound on polling, not a threshold


def s3_as(stack, user):
    """An S3 client with a tenant's own keys (secrets/rgw_<user>_access_key)."""
    secrets = Path(stack["DEVSTACK_DIR"]) / "secrets"
    kwargs = dict(aws_kwargs(stack),
                  aws_access_key_id=(secrets / ("rgw_%s_access_key" % user)).read_text().strip(),
                  aws_secret_access_key=(secrets / ("rgw_%s_secret_key" % user)).read_text().strip())
    return boto3.client("s3", **kwargs)


def denied(call):
    """RGW's error code for a refused call (fails if it was allowed)."""
    with pytest.raises(ClientError) as refused:
        call()
    return refused.value.response["Error"]["Code"]


@pytest.fixture
def buckets(stack, s3, unique_name):
    """alice's and bob's repository buckets, owned by the publisher, each granted to its user only."""
    names = {"alice": unique_name + "-alice", "bob": unique_name + "-bob"}
    for user, bucket in names.items():
        s3.create_bucket(Bucket=bucket)
        s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(rights.tenant_bucket_policy(bucket, user)))
    return names


def test_the_stack_has_the_tenants(stack):
    assert stack["RGW_TENANT_USERS"].split() == list(rights.RGW_TENANT_USERS) == ["alice", "bob"]


def test_a_users_keys_reach_their_own_bucket_only(stack, s3, buckets):
    alice, bob = s3_as(stack, "alice"), s3_as(stack, "bob")
    alice.put_object(Bucket=buckets["alice"], Key="cvmfs/a.txt", Body=b"alice's")
    assert alice.get_object(Bucket=buckets["alice"], Key="cvmfs/a.txt")["Body"].read() == b"alice's"
    assert [o["Key"] for o in alice.list_objects_v2(Bucket=buckets["alice"])["Contents"]] == ["cvmfs/a.txt"]
    # Not outside the content prefix: the publisher's reports are its own.
    assert denied(lambda: alice.put_object(Bucket=buckets["alice"], Key=".cvmfs-publisher/x", Body=b"x")) == \
        "AccessDenied"

    # bob cannot read, list, change or delete anything of alice's bucket ...
    target = buckets["alice"]
    assert denied(lambda: bob.list_objects_v2(Bucket=target)) == "AccessDenied"
    assert denied(lambda: bob.get_object(Bucket=target, Key="cvmfs/a.txt")) == "AccessDenied"
    assert denied(lambda: bob.put_object(Bucket=target, Key="cvmfs/b.txt", Body=b"bob's")) == "AccessDenied"
    # RGW 16.2 (civetweb) answers a refused DeleteObject with 405; the object stays (checked below).
    assert denied(lambda: bob.delete_object(Bucket=target, Key="cvmfs/a.txt")) in ("AccessDenied", "MethodNotAllowed")
    assert denied(lambda: bob.delete_bucket(Bucket=target)) == "AccessDenied"
    assert denied(lambda: bob.put_bucket_policy(Bucket=target, Policy=json.dumps(
        rights.tenant_bucket_policy(target, "bob")))) == "AccessDenied"
    # ... nor its notifications (RGW 16.2: the owner only), and alice cannot change her own bucket's either.
    notification = {"TopicConfigurations": [{"Id": "x", "TopicArn": "arn:aws:sns:default::%s" % target,
                                             "Events": ["s3:ObjectCreated:*"]}]}
    assert denied(lambda: bob.get_bucket_notification_configuration(Bucket=target)) == "AccessDenied"
    assert denied(lambda: bob.put_bucket_notification_configuration(
        Bucket=target, NotificationConfiguration=notification)) == "AccessDenied"
    # (RGW 16.2 says 405 MethodNotAllowed to a user the bucket policy lets in otherwise.)
    assert denied(lambda: alice.put_bucket_notification_configuration(
        Bucket=target, NotificationConfiguration=notification)) in ("AccessDenied", "MethodNotAllowed")
    assert s3.get_bucket_notification_configuration(Bucket=target).get("TopicConfigurations", []) == []
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=target)["Contents"]] == ["cvmfs/a.txt"]
    assert s3.get_object(Bucket=target, Key="cvmfs/a.txt")["Body"].read() == b"alice's"


def test_bobs_upload_reaches_bobs_queue_only(stack, s3, buckets, unique_name):
    """The routing that keeps repositories apart: bucket -> its own topic -> routing key -> its own queue."""
    rabbitmq = dict(api_url="{{ cvmfs_publisher_rabbitmq_api_url }}",
                    login_user="{{ cvmfs_publisher_rabbitmq_user }}",
                    login_password_file="{{ cvmfs_publisher_rabbitmq_password_file }}")
    rgw = dict(endpoint_url="{{ cvmfs_publisher_rgw_endpoint }}",
               access_key_file="{{ cvmfs_publisher_rgw_access_key_file }}",
               secret_key_file="{{ cvmfs_publisher_rgw_secret_key_file }}")
    for bucket in buckets.values():
        assert run_module("infn_cloud.cvmfs_publisher.amqp_queue", dict(rabbitmq, name=bucket))[0] == 0
        rc, topic = run_module("infn_cloud.cvmfs_publisher.rgw_topic", dict(
            rgw, name=bucket, push_endpoint="{{ cvmfs_publisher_topic_push_endpoint }}", persistent=False))
        assert rc == 0, topic
        rc, result = run_module(RGW, dict(rgw, bucket=bucket, topic_arn=topic["arn"]))
        assert rc == 0, result

    s3_as(stack, "bob").put_object(Bucket=buckets["bob"], Key="cvmfs/bob.txt", Body=b"bob's")

    connection = pika.BlockingConnection(amqp_parameters(stack, "daemon"))
    try:
        channel = connection.channel()
        received = {}
        for user, queue in buckets.items():
            received[user] = []
            deadline = time.monotonic() + (DELIVERY_WAIT if user == "bob" else 5)
            for method, _, body in channel.consume(queue, auto_ack=True, inactivity_timeout=1):
                if method is not None:
                    received[user].append(body)
                elif received[user] or time.monotonic() > deadline:
                    break
            channel.cancel()
    finally:
        connection.close()
    assert received["alice"] == []
    records = [record for body in received["bob"] for record in json.loads(body)["Records"]]
    assert [(r["s3"]["bucket"]["name"], r["s3"]["object"]["key"]) for r in records] == \
        [(buckets["bob"], "cvmfs/bob.txt")]
    # Events carry what changed, never the content: the publisher reads it from the bucket itself.
    assert b"bob's" not in b"".join(received["bob"])


def test_publisher_by_bucket_policy_on_rgw_16_2(stack, s3, unique_name):
    """A bucket a user owns, granting the publisher what a newer Ceph honours: on 16.2 the objects part works and
    the notification part is refused (the owner only), and the module says who lacks what."""
    alice = s3_as(stack, "alice")
    bucket = unique_name + "-own"
    alice.create_bucket(Bucket=bucket)
    alice.put_object(Bucket=bucket, Key="cvmfs/a.txt", Body=b"a")
    alice.put_bucket_policy(Bucket=bucket, Policy=json.dumps(rights.publisher_bucket_policy(bucket, "devstack")))
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["cvmfs/a.txt"]
    assert s3.get_object(Bucket=bucket, Key="cvmfs/a.txt")["Body"].read() == b"a"
    s3.put_object(Bucket=bucket, Key=".cvmfs-publisher/report.json", Body=b"{}")
    assert denied(lambda: s3.put_object(Bucket=bucket, Key="cvmfs/b.txt", Body=b"b")) == "AccessDenied"
    assert denied(lambda: s3.delete_object(Bucket=bucket, Key="cvmfs/a.txt")) in ("AccessDenied", "MethodNotAllowed")

    rc, result = run_module(RGW, dict(endpoint_url="{{ cvmfs_publisher_rgw_endpoint }}",
                                      access_key_file="{{ cvmfs_publisher_rgw_access_key_file }}",
                                      secret_key_file="{{ cvmfs_publisher_rgw_secret_key_file }}", bucket=bucket,
                                      topic_arn="arn:aws:sns:default::%s" % bucket))
    assert rc != 0
    access_key = Path(stack["RGW_ACCESS_KEY_FILE"]).read_text().strip()
    assert ("RGW identity '%s' lacks s3:GetBucketNotification (RGW 16.2 allows bucket notification calls to the "
            "bucket's owner only, whatever its policy says)" % access_key) in result["msg"], result["msg"]
    assert Path(stack["RGW_SECRET_KEY_FILE"]).read_text().strip() not in json.dumps(result)


# -- Vault ------------------------------------------------------------------------------------------------------------

def _vault_args(stack, fqrn, subject, keys_dir, secret_id_file=None):
    return dict(url=stack["VAULT_ADDR"], role_id_file=stack["VAULT_ROLE_ID_FILE"],
                secret_id_file=secret_id_file or stack["VAULT_SECRET_ID_FILE"], kv_mount=stack["VAULT_KV_MOUNT"],
                repository=fqrn, subject=subject, keys_dir=str(keys_dir))


def _seed(stack, fqrn, subject):
    subprocess.run([str(REPO_ROOT / "devstack" / "stack"), "seed-keys", fqrn, "--subject", subject], check=True,
                   capture_output=True, text=True, timeout=120)


def test_a_request_reads_only_its_own_vault_path(stack, unique_name, tmp_path):
    """The keys path is <subject>/cvmfs_keys/<fqrn> of the request: another repository's name never yields alice's
    keys, and no subject can climb out of its own path."""
    alice_fqrn, bob_fqrn, subject = unique_name + "a.infn.it", unique_name + "b.infn.it", "alice-" + unique_name
    _seed(stack, alice_fqrn, subject)
    keys_dir = tmp_path / "keys"
    rc, result = run_module("infn_cloud.cvmfs_publisher.vault_repository_keys",
                            _vault_args(stack, bob_fqrn, subject, keys_dir))
    assert rc != 0
    assert result["msg"].startswith("no keys for %s at secrets/%s/cvmfs_keys/%s in Vault" % (bob_fqrn, subject,
                                                                                           bob_fqrn)), result["msg"]
    for hostile in ("../" + subject, subject + "/cvmfs_keys/" + alice_fqrn, "groups/x"):
        rc, result = run_module("infn_cloud.cvmfs_publisher.vault_repository_keys",
                                _vault_args(stack, bob_fqrn, hostile, keys_dir))
        assert rc != 0 and ("invalid subject %r" % hostile) in result["msg"], result["msg"]
    assert not keys_dir.exists()


def test_secret_id_expires_and_wears_out(stack, unique_name, tmp_path):
    """The stack issues secret_ids with a TTL and a use limit; a worn-out one is a clear login failure."""
    root = hvac.Client(url=stack["VAULT_ADDR"], token=Path(stack["VAULT_TOKEN_FILE"]).read_text().strip())
    role = root.read("auth/approle/role/cvmfs-publisher")["data"]
    assert role["secret_id_ttl"] > 0 and role["secret_id_num_uses"] > 0
    looked_up = root.write("auth/approle/role/cvmfs-publisher/secret-id/lookup",
                           secret_id=Path(stack["VAULT_SECRET_ID_FILE"]).read_text().strip())["data"]
    assert looked_up["secret_id_ttl"] == role["secret_id_ttl"]
    assert 0 < looked_up["secret_id_num_uses"] <= role["secret_id_num_uses"]  # what is left of the limit

    fqrn, subject = unique_name + ".infn.it", "sub-" + unique_name
    _seed(stack, fqrn, subject)
    once = tmp_path / "secret-id"
    once.write_text(root.write("auth/approle/role/cvmfs-publisher/secret-id", num_uses=1)["data"]["secret_id"])
    module = "infn_cloud.cvmfs_publisher.vault_repository_keys"
    rc, first = run_module(module, _vault_args(stack, fqrn, subject, tmp_path / "k1", str(once)))
    assert rc == 0 and first["changed"], first
    rc, second = run_module(module, _vault_args(stack, fqrn, subject, tmp_path / "k2", str(once)))
    assert rc != 0
    assert second["msg"].startswith("AppRole login at %s (auth mount 'approle') failed: invalid role_id or "
                                    "secret_id" % stack["VAULT_ADDR"]), second["msg"]
    assert once.read_text() not in json.dumps(second)


# -- events carry no content ------------------------------------------------------------------------------------------

def test_a_forged_event_can_at_most_make_a_repository_reread_its_own_bucket(stack, s3, unique_name, tmp_path):
    """RGW's broker identity has a well-known password on 16.2 over http (guest/guest), so anyone may forge events
    on the notification exchange. An event says which key changed, never what it holds: the daemon re-reads the
    repository's own bucket, and a record naming another bucket is ignored. alice's repository ends up exactly
    as alice's bucket, with nothing of bob's and nothing the forged events claimed."""
    e2e = consumer_e2e()
    alice, bob = unique_name + "a", unique_name + "b"
    daemon = e2e.DaemonProcess(stack, tmp_path, "daemon", "publisher-" + unique_name, unique_name + ".dlq",
                               ["%s*.infn.it" % unique_name])
    for user, bucket in (("alice", alice), ("bob", bob)):
        s3.create_bucket(Bucket=bucket)
        s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(rights.tenant_bucket_policy(bucket, user)))
    s3_as(stack, "bob").put_object(Bucket=bob, Key="cvmfs/bob-only.txt", Body=b"bob's secret\n")
    fqrn = alice + ".infn.it"
    e2e.seed_keys(stack, fqrn, "sub-" + alice)
    daemon.start()
    try:
        e2e.publish(stack, "publisher-" + unique_name, "%s,sub-%s,%s,P" % (alice, alice, fqrn))
        daemon.wait_for(lambda e: e.get("event") == "consuming" and e.get("queue") == alice,
                        "alice's repository was never provisioned and consumed")

        def forged(bucket, key):
            return json.dumps({"Records": [{"eventName": "ObjectCreated:Put", "s3": {
                "bucket": {"name": bucket}, "object": {"key": key, "size": 13, "eTag": "0" * 32,
                                                       "content": "forged content\n"}}}]}).encode()
        connection = pika.BlockingConnection(amqp_parameters(stack, "rgw"))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            for body in (forged(bob, "cvmfs/bob-only.txt"), forged(alice, "cvmfs/bob-only.txt"),
                         forged(alice, "cvmfs/forged.txt")):
                channel.basic_publish(stack["AMQP_EXCHANGE"], alice, body, pika.BasicProperties(delivery_mode=2),
                                      mandatory=True)
        finally:
            connection.close()
        daemon.wait_for(lambda e: e.get("event") in ("run_succeeded", "run_failed") and e.get("repository") == fqrn
                        and e.get("mode") in ("changes", "full"), "the forged events never caused a run")
        s3_as(stack, "alice").put_object(Bucket=alice, Key="cvmfs/alice.txt", Body=b"alice's\n")
        assert e2e.wait_published(stack, s3, fqrn, alice) == {"alice.txt": e2e.bucket_files(s3, alice)["alice.txt"]}
        assert not [e for e in daemon.events() if e.get("event") == "run_failed"]
        ignored = [e.get("message", "") for e in daemon.events() if e.get("event") == "ignored"]
        assert any("bucket %r, not %r" % (bob, alice) in m for m in ignored), ignored
    finally:
        daemon.stop()
    daemon.assert_no_secret(e2e.stack_secrets(stack))
