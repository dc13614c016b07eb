"""Tenants kept apart on the real stack: alice's and bob's S3 keys, events, repositories and Vault paths.

The stack has the publisher's S3 identity (it owns the repositories' buckets, as RGW 16.2 requires of whoever
manages a bucket's notification) and two users, alice and bob, each granted devstack/rights.py's
``tenant_bucket_policy`` on their own bucket only. Refusals are asserted on RGW's, RabbitMQ's and the modules' words.

alice and bob live in the publisher's (default, empty) RGW tenant, where RGW 16.2 topics are open to every user. The
``_on_rgw_16_2`` tests below prove on the stack's radosgw why they stay there: a user of an RGW tenant of their own
reaches the publisher's bucket (as ``:<bucket>``) but their uploads raise no event, and the tenant keeps them away
from the publisher's topics but not from the persistent queues behind them (docs/operator-guide.md, "Rights").
"""
import json
import secrets
import string
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import boto3
import botocore.handlers
import hvac
import pika
import pytest
from botocore.exceptions import ClientError

from helpers import REPO_ROOT, amqp_parameters, aws_kwargs, ceph_env, consumer_e2e, radosgw_admin, run_module

sys.path.insert(0, str(REPO_ROOT / "devstack"))
import rights  # noqa: E402  (the stack's own rights: one place for the policies)

RGW = "infn_cloud.cvmfs_publisher.rgw_bucket_notification"
DELIVERY_WAIT = 60  # seconds: a bound on polling, not a threshold


def _keys_of(stack, user):
    secrets_dir = Path(stack["DEVSTACK_DIR"]) / "secrets"
    return dict(aws_access_key_id=(secrets_dir / ("rgw_%s_access_key" % user)).read_text().strip(),
                aws_secret_access_key=(secrets_dir / ("rgw_%s_secret_key" % user)).read_text().strip())


def s3_as(stack, user):
    """An S3 client with a tenant's own keys (secrets/rgw_<user>_access_key)."""
    return boto3.client("s3", **dict(aws_kwargs(stack), **_keys_of(stack, user)))


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


def sns_error(call):
    """(HTTP status, RGW's error code) of a refused SNS call. RGW 16.2 answers SNS calls with S3-style errors,
    which botocore's query parser leaves at the top of the response instead of under "Error"."""
    with pytest.raises(ClientError) as refused:
        call()
    response = refused.value.response
    return response["ResponseMetadata"]["HTTPStatusCode"], response.get("Error", {}).get("Code") or response["Code"]


@pytest.fixture
def other_tenant(stack, unique_name):
    """A user in an RGW tenant of their own (tenant = uid, as a site would make them), with an S3 client that may
    name a bucket of the publisher's tenant ":<bucket>" (botocore's validate_bucket_name refuses ':'; the client
    sends it percent-encoded, path-style: GET /%3A<bucket>/<key>) and an SNS client. Removed at the end."""
    name = "u" + unique_name
    access_key = "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(20))
    secret_key = secrets.token_urlsafe(30)
    radosgw_admin(stack, "user", "create", "--tenant", name, "--uid", name, "--display-name", "tenant " + name,
                   "--access-key", access_key, "--secret-key", secret_key)
    kwargs = dict(aws_kwargs(stack), aws_access_key_id=access_key, aws_secret_access_key=secret_key)
    s3 = boto3.client("s3", **kwargs)
    s3.meta.events.unregister("before-parameter-build.s3", botocore.handlers.validate_bucket_name)
    yield SimpleNamespace(name=name, s3=s3, sns=boto3.client("sns", **kwargs))
    radosgw_admin(stack, "user", "rm", "--tenant", name, "--uid", name)


def _wire(bucket, persistent=False):
    """What provisioning does for a repository (as the publisher, through the modules): its queue bound to the
    notification exchange by the bucket's name, its topic, the bucket's notification. Returns the topic's ARN."""
    rabbitmq = dict(api_url="{{ cvmfs_publisher_rabbitmq_api_url }}",
                    login_user="{{ cvmfs_publisher_rabbitmq_user }}",
                    login_password_file="{{ cvmfs_publisher_rabbitmq_password_file }}")
    rgw = dict(endpoint_url="{{ cvmfs_publisher_rgw_endpoint }}",
               access_key_file="{{ cvmfs_publisher_rgw_access_key_file }}",
               secret_key_file="{{ cvmfs_publisher_rgw_secret_key_file }}")
    assert run_module("infn_cloud.cvmfs_publisher.amqp_queue", dict(rabbitmq, name=bucket))[0] == 0
    rc, topic = run_module("infn_cloud.cvmfs_publisher.rgw_topic", dict(
        rgw, name=bucket, push_endpoint="{{ cvmfs_publisher_topic_push_endpoint }}", persistent=persistent))
    assert rc == 0, topic
    rc, result = run_module(RGW, dict(rgw, bucket=bucket, topic_arn=topic["arn"]))
    assert rc == 0, result
    return topic["arn"]


def _records_until(stack, queue, last_key):
    """(event name, bucket, key) of every record on the queue up to the one for ``last_key`` (waits for it)."""
    records = []
    connection = pika.BlockingConnection(amqp_parameters(stack, "daemon"))
    try:
        channel = connection.channel()
        deadline = time.monotonic() + DELIVERY_WAIT
        for method, _, body in channel.consume(queue, auto_ack=True, inactivity_timeout=1):
            if method is not None:
                records += [(r["eventName"], r["s3"]["bucket"]["name"], r["s3"]["object"]["key"])
                            for r in json.loads(body)["Records"]]
            if any(key == last_key for _, _, key in records) or time.monotonic() > deadline:
                break
        channel.cancel()
    finally:
        connection.close()
    return records


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
    for bucket in buckets.values():
        _wire(bucket)

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


# -- RGW 16.2 tenants: why alice and bob stay in the publisher's tenant ------------------------------------------------

def test_a_user_of_another_tenant_reaches_the_bucket_but_raises_no_event_on_rgw_16_2(stack, s3, unique_name,
                                                                                      other_tenant):
    """A user in an RGW tenant of their own, granted the publisher's bucket by policy (principal
    arn:aws:iam::<tenant>:user/<uid>), lists, reads, writes and deletes under cvmfs/ of ":<bucket>" (RGW's
    rgw_parse_url_bucket: the empty tenant's bucket). But RGW 16.2 looks the bucket's notifications up in the
    uploader's tenant (rgw_notify.cc, publish_reserve), where the bucket has none: their uploads and deletions raise
    no event, while the publisher's own, on the same bucket and notification, do. A repository whose user is in
    another tenant would never be published."""
    user, bucket = other_tenant, unique_name
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(
        rights.tenant_bucket_policy(bucket, user.name, tenant=user.name)))
    _wire(bucket)
    theirs = ":" + bucket

    user.s3.put_object(Bucket=theirs, Key="cvmfs/tenant.txt", Body=b"tenant's")
    assert user.s3.get_object(Bucket=theirs, Key="cvmfs/tenant.txt")["Body"].read() == b"tenant's"
    assert [o["Key"] for o in user.s3.list_objects_v2(Bucket=theirs)["Contents"]] == ["cvmfs/tenant.txt"]
    assert denied(lambda: user.s3.put_object(Bucket=theirs, Key=".cvmfs-publisher/x", Body=b"x")) == "AccessDenied"
    # (RGWPSListNotifsOp::verify_permission looks the bucket up in their own tenant: 405 from RGW 16.2.)
    assert denied(lambda: user.s3.get_bucket_notification_configuration(Bucket=theirs)) in \
        ("AccessDenied", "MethodNotAllowed")
    assert s3.get_object(Bucket=bucket, Key="cvmfs/tenant.txt")["Body"].read() == b"tenant's"
    # The publisher's upload after theirs: its event arrives, theirs never came before it.
    s3.put_object(Bucket=bucket, Key="cvmfs/publisher.txt", Body=b"publisher's")
    assert _records_until(stack, bucket, "cvmfs/publisher.txt") == \
        [("ObjectCreated:Put", bucket, "cvmfs/publisher.txt")]

    user.s3.delete_object(Bucket=theirs, Key="cvmfs/tenant.txt")
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["cvmfs/publisher.txt"]
    s3.delete_object(Bucket=bucket, Key="cvmfs/publisher.txt")
    assert _records_until(stack, bucket, "cvmfs/publisher.txt") == \
        [("ObjectRemoved:Delete", bucket, "cvmfs/publisher.txt")]


def test_users_of_the_publishers_tenant_reach_its_topics_on_rgw_16_2(stack, sns, unique_name):
    """The limit the stack lives with: RGW 16.2 checks no permission on topic calls (their verify_permission
    returns 0) and keeps topics per tenant, so alice's keys list, read, re-point and delete the publisher's topic
    of bob's repository."""
    alice = boto3.client("sns", **dict(aws_kwargs(stack), **_keys_of(stack, "alice")))
    arn = sns.create_topic(Name=unique_name, Attributes={"push-endpoint": stack["TOPIC_PUSH_ENDPOINT"],
                                                         "amqp-exchange": stack["AMQP_EXCHANGE"]})["TopicArn"]
    assert arn == "arn:aws:sns:%s::%s" % (stack["RGW_REGION"], unique_name)
    assert arn in [t["TopicArn"] for t in alice.list_topics()["Topics"]]
    assert alice.get_topic_attributes(TopicArn=arn)["Attributes"] == \
        sns.get_topic_attributes(TopicArn=arn)["Attributes"]
    assert alice.create_topic(Name=unique_name, Attributes={"push-endpoint": "amqp://127.0.0.1:1",
                                                            "amqp-exchange": "elsewhere"})["TopicArn"] == arn
    assert json.loads(sns.get_topic_attributes(TopicArn=arn)["Attributes"]["EndPoint"])["EndpointAddress"] == \
        "amqp://127.0.0.1:1"
    alice.delete_topic(TopicArn=arn)
    assert sns_error(lambda: sns.get_topic_attributes(TopicArn=arn)) == (404, "NoSuchEntity")


def test_topics_are_per_tenant_but_persistent_queues_are_not_on_rgw_16_2(stack, s3, sns, unique_name, other_tenant):
    """A user of another tenant neither lists, reads, overwrites nor deletes the publisher's topic: every topic call
    acts on the caller's tenant (RGWPubSub of the requester's tenant, topics in the RADOS object pubsub.<tenant>)
    and reads only the name out of a TopicArn. But the queue RGW 16.2 keeps for a persistent topic is the RADOS
    object named after the topic alone (rgw_notify.cc, add/remove_persistent_topic), and DeleteTopic removes it
    before looking at any topic: their DeleteTopic leaves the publisher's topic as it was and removes its queue, and
    from then on every upload into the repository's bucket is refused until the publisher creates the topic again."""
    user, bucket = other_tenant, unique_name
    s3.create_bucket(Bucket=bucket)
    arn = _wire(bucket, persistent=True)
    before = sns.get_topic_attributes(TopicArn=arn)["Attributes"]
    assert json.loads(before["EndPoint"])["Persistent"] == "true"

    assert user.sns.list_topics()["Topics"] == []
    assert sns_error(lambda: user.sns.get_topic_attributes(TopicArn=arn)) == (404, "NoSuchEntity")
    # The same name lands in their own tenant (its ARN says so); the publisher's topic is untouched.
    theirs = user.sns.create_topic(Name=bucket, Attributes={"push-endpoint": "amqp://127.0.0.1:1",
                                                            "amqp-exchange": "elsewhere"})["TopicArn"]
    assert theirs == "arn:aws:sns:%s:%s:%s" % (stack["RGW_REGION"], user.name, bucket)
    assert [t["TopicArn"] for t in user.sns.list_topics()["Topics"]] == [theirs]
    assert sns.get_topic_attributes(TopicArn=arn)["Attributes"] == before
    assert _notif_queue_exists(stack, bucket)
    s3.put_object(Bucket=bucket, Key="cvmfs/before.txt", Body=b"1")

    user.sns.delete_topic(TopicArn=arn)     # accepted: it removes *their* topic of that name ...
    assert user.sns.list_topics()["Topics"] == []
    assert sns.get_topic_attributes(TopicArn=arn)["Attributes"] == before     # ... the publisher's stays as it was
    assert arn in [t["TopicArn"] for t in sns.list_topics()["Topics"]]
    assert not _notif_queue_exists(stack, bucket)                            # ... but its queue is gone,
    # and RGW refuses every upload into the bucket (its log: "failed to reserve notification on queue: <topic>.
    # error: -22"), the publisher's as any user's.
    assert denied(lambda: s3.put_object(Bucket=bucket, Key="cvmfs/after.txt", Body=b"2")) == "InvalidArgument"

    # The publisher's next provisioning run makes the queue again: rgw_topic finds the topic unchanged (changed=False)
    # and sends its attributes again, and RGW's CreateTopic re-creates a missing queue (add_persistent_topic).
    rc, again = run_module("infn_cloud.cvmfs_publisher.rgw_topic", dict(
        endpoint_url=stack["RGW_ENDPOINT"], access_key_file=stack["RGW_ACCESS_KEY_FILE"],
        secret_key_file=stack["RGW_SECRET_KEY_FILE"], name=bucket, persistent=True,
        push_endpoint=stack["TOPIC_PUSH_ENDPOINT"]))
    assert rc == 0 and again["changed"] is False and again["arn"] == arn, again
    assert _notif_queue_exists(stack, bucket)
    s3.put_object(Bucket=bucket, Key="cvmfs/again.txt", Body=b"3")
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["cvmfs/again.txt", "cvmfs/before.txt"]


def _notif_queue_exists(stack, topic):
    """Whether RGW's persistent queue for ``topic`` exists: the RADOS object of that name in the zone's log pool,
    namespace "notif" (the local stack's zone: default.rgw.log)."""
    result = subprocess.run(["rados", "-p", "default.rgw.log", "-N", "notif", "stat", topic], capture_output=True,
                            text=True, timeout=60, env=ceph_env(stack))
    assert result.returncode == 0 or "(2) No such file or directory" in result.stderr, result.stderr
    return result.returncode == 0


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
