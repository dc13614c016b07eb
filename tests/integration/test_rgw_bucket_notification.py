"""rgw_bucket_notification against the local stack's real Ceph RGW 16.2, run through ansible as an operator does;
the last test wires queue, topic and notification with the three modules and checks that an upload arrives."""
import json

import pika
import pytest

from helpers import run_module

MODULE = "infn_cloud.cvmfs_publisher.rgw_bucket_notification"
CONNECTION = dict(endpoint_url="{{ cvmfs_publisher_rgw_endpoint }}",
                  access_key_file="{{ cvmfs_publisher_rgw_access_key_file }}",
                  secret_key_file="{{ cvmfs_publisher_rgw_secret_key_file }}")
EVENTS = ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]


@pytest.fixture
def bucket_and_topics(stack, s3, sns, unique_name):
    """A fresh bucket, two topics, and another tool's notification ("audit") that must survive every run."""
    s3.create_bucket(Bucket=unique_name)
    attributes = {"push-endpoint": stack["TOPIC_PUSH_ENDPOINT"], "amqp-exchange": stack["AMQP_EXCHANGE"],
                  "amqp-ack-level": "none"}
    topic = sns.create_topic(Name=unique_name, Attributes=attributes)["TopicArn"]
    other_topic = sns.create_topic(Name=unique_name + "-other", Attributes=attributes)["TopicArn"]
    audit = {"Id": "audit", "TopicArn": other_topic, "Events": ["s3:ObjectCreated:Put"]}
    s3.put_bucket_notification_configuration(Bucket=unique_name,
                                             NotificationConfiguration={"TopicConfigurations": [audit]})
    return unique_name, topic, other_topic, audit


def configurations(s3, bucket):
    return s3.get_bucket_notification_configuration(Bucket=bucket).get("TopicConfigurations", [])


def entries(s3, bucket, notification_id):
    return [c for c in configurations(s3, bucket) if c["Id"] == notification_id]


def test_create_idempotent_update_delete_leaving_other_ids(s3, bucket_and_topics):
    bucket, topic, other_topic, audit = bucket_and_topics
    args = dict(CONNECTION, bucket=bucket, topic_arn=topic)

    rc, created = run_module(MODULE, args, diff=True)
    assert rc == 0 and created["changed"] and created["other_ids"] == ["audit"], created
    assert created["diff"]["before"] is None
    assert created["diff"]["after"] == dict(id="cvmfs-publisher", topic_arn=topic, events=EVENTS, prefix="cvmfs/",
                                            suffix="")
    [mine] = entries(s3, bucket, "cvmfs-publisher")
    assert sorted(mine["Events"]) == EVENTS
    assert mine["Filter"]["Key"]["FilterRules"] == [{"Name": "prefix", "Value": "cvmfs/"}]

    # Same events in another order: nothing to do.
    rc, again = run_module(MODULE, dict(args, events=list(reversed(EVENTS))))
    assert rc == 0 and again["changed"] is False, again

    rc, updated = run_module(MODULE, dict(args, prefix="cvmfs/sw/", suffix=".tar"), diff=True)
    assert rc == 0 and updated["changed"], updated
    assert updated["diff"]["before"]["prefix"] == "cvmfs/" and updated["diff"]["after"]["suffix"] == ".tar"
    [mine] = entries(s3, bucket, "cvmfs-publisher")
    assert sorted((r["Name"], r["Value"]) for r in mine["Filter"]["Key"]["FilterRules"]) == [
        ("prefix", "cvmfs/sw/"), ("suffix", ".tar")]

    # RGW 16.2 keeps one entry per Id and topic: a topic change must still leave exactly one entry.
    rc, retargeted = run_module(MODULE, dict(CONNECTION, bucket=bucket, topic_arn=other_topic))
    assert rc == 0 and retargeted["changed"], retargeted
    [mine] = entries(s3, bucket, "cvmfs-publisher")
    assert mine["TopicArn"] == other_topic
    assert entries(s3, bucket, "audit") == [audit]

    rc, deleted = run_module(MODULE, dict(CONNECTION, bucket=bucket, state="absent"), diff=True)
    assert rc == 0 and deleted["changed"] and deleted["diff"]["after"] is None, deleted
    assert [c["Id"] for c in configurations(s3, bucket)] == ["audit"]
    assert entries(s3, bucket, "audit") == [audit]
    rc, deleted_again = run_module(MODULE, dict(CONNECTION, bucket=bucket, state="absent"))
    assert rc == 0 and deleted_again["changed"] is False


def test_check_mode_predicts_and_changes_nothing(s3, bucket_and_topics):
    bucket, topic, _, audit = bucket_and_topics
    args = dict(CONNECTION, bucket=bucket, topic_arn=topic)
    rc, predicted = run_module(MODULE, args, check=True, diff=True)
    assert rc == 0 and predicted["changed"], predicted
    assert entries(s3, bucket, "cvmfs-publisher") == []

    assert run_module(MODULE, args)[1]["changed"]
    rc, update_predicted = run_module(MODULE, dict(args, events=["s3:ObjectCreated:*"]), check=True)
    assert rc == 0 and update_predicted["changed"]
    assert sorted(entries(s3, bucket, "cvmfs-publisher")[0]["Events"]) == EVENTS
    rc, delete_predicted = run_module(MODULE, dict(CONNECTION, bucket=bucket, state="absent"), check=True)
    assert rc == 0 and delete_predicted["changed"] and len(entries(s3, bucket, "cvmfs-publisher")) == 1


def test_removing_the_last_notification(s3, bucket_and_topics):
    """RGW 16.2 refuses an empty configuration (MalformedXML): the last Id must still go."""
    bucket, topic, _, _ = bucket_and_topics
    assert run_module(MODULE, dict(CONNECTION, bucket=bucket, id="audit", state="absent"))[1]["changed"]
    assert run_module(MODULE, dict(CONNECTION, bucket=bucket, topic_arn=topic))[1]["changed"]
    rc, deleted = run_module(MODULE, dict(CONNECTION, bucket=bucket, state="absent"))
    assert rc == 0 and deleted["changed"] and deleted["other_ids"] == [], deleted
    assert configurations(s3, bucket) == []


def test_missing_bucket_is_named(stack, unique_name):
    rc, result = run_module(MODULE, dict(CONNECTION, bucket=unique_name, topic_arn="arn:aws:sns:default::x"))
    assert rc != 0
    assert result["msg"].startswith("bucket '%s' does not exist at %s" % (unique_name, stack["RGW_ENDPOINT"]))
    rc, absent = run_module(MODULE, dict(CONNECTION, bucket=unique_name, state="absent"))
    assert rc == 0 and absent["changed"] is False and absent["bucket_exists"] is False, absent


def test_upload_reaches_the_queue_through_the_three_modules(stack, s3, unique_name):
    """amqp_queue + rgw_topic + rgw_bucket_notification, as the provisioning playbook chains them."""
    rabbitmq = dict(api_url="{{ cvmfs_publisher_rabbitmq_api_url }}",
                    login_user="{{ cvmfs_publisher_rabbitmq_user }}",
                    login_password_file="{{ cvmfs_publisher_rabbitmq_password_file }}")
    rc, queue = run_module("infn_cloud.cvmfs_publisher.amqp_queue", dict(rabbitmq, name=unique_name))
    assert rc == 0, queue
    # Not persistent: RGW then pushes each event before put_object returns (a new persistent topic starts late).
    rc, topic = run_module("infn_cloud.cvmfs_publisher.rgw_topic", dict(
        CONNECTION, name=unique_name, push_endpoint="{{ cvmfs_publisher_topic_push_endpoint }}", persistent=False))
    assert rc == 0, topic
    s3.create_bucket(Bucket=unique_name)
    rc, notification = run_module(MODULE, dict(CONNECTION, bucket=unique_name, topic_arn=topic["arn"]))
    assert rc == 0, notification

    s3.put_object(Bucket=unique_name, Key="cvmfs/hello.txt", Body=b"hello")
    s3.put_object(Bucket=unique_name, Key="elsewhere/ignored.txt", Body=b"not under the prefix")

    with open(stack["AMQP_PASSWORD_FILE"]) as handle:
        password = handle.read().strip()
    connection = pika.BlockingConnection(pika.ConnectionParameters(
        host=stack["AMQP_HOST"], port=int(stack["AMQP_PORT"]), virtual_host=stack["AMQP_VHOST"],
        credentials=pika.PlainCredentials(stack["AMQP_USER"], password)))
    try:
        channel = connection.channel()
        bodies = []
        # basic.get is refused on single-active-consumer quorum queues: consume, stop once the queue goes quiet.
        # With amqp-ack-level broker the events are in the queue before put_object returns.
        for attempt, (method, _, body) in enumerate(channel.consume(unique_name, auto_ack=True, inactivity_timeout=1)):
            if method is not None:
                bodies.append(body)
            elif bodies or attempt > 60:
                break
        channel.cancel()
    finally:
        connection.close()
    keys = [record["s3"]["object"]["key"] for body in bodies for record in json.loads(body)["Records"]]
    assert keys == ["cvmfs/hello.txt"]


def test_another_ids_rgw_filters_survive_the_merge(stack, s3, bucket_and_topics):
    """RGW's own filter sections (S3Metadata, S3Tags), which boto3 cannot read or write, of another tool's
    notification are put back as they were when the module merges its own notification in (a Put merges by Id:
    the other Id's entry is overwritten with what is sent)."""
    from pathlib import Path

    from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw.client import Connection
    from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw.notification import bucket_url

    bucket, topic, other_topic, _ = bucket_and_topics
    rgw = Connection(dict(endpoint_url=stack["RGW_ENDPOINT"], region=stack["RGW_REGION"],
                          access_key=Path(stack["RGW_ACCESS_KEY_FILE"]).read_text().strip(),
                          secret_key=Path(stack["RGW_SECRET_KEY_FILE"]).read_text().strip(),
                          ca_bundle=stack.get("CA_CERT_FILE") or None))
    url = bucket_url(rgw, bucket, "notification")
    filters = ("<S3Metadata><FilterRule><Name>x-amz-meta-team</Name><Value>cms</Value></FilterRule></S3Metadata>"
               "<S3Tags><FilterRule><Name>stage</Name><Value>final</Value></FilterRule></S3Tags>")
    rgw.signed_request("PUT", url, "PutBucketNotificationConfiguration", body=(
        '<NotificationConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><TopicConfiguration><Id>audit'
        "</Id><Topic>%s</Topic><Event>s3:ObjectCreated:Put</Event><Filter>%s</Filter></TopicConfiguration>"
        "</NotificationConfiguration>" % (other_topic, filters)).encode())

    rc, created = run_module(MODULE, dict(CONNECTION, bucket=bucket, topic_arn=topic))
    assert rc == 0 and created["changed"] and created["other_ids"] == ["audit"], created
    answer = rgw.signed_request("GET", url, "GetBucketNotificationConfiguration").content.decode()
    assert answer.count("<TopicConfiguration>") == 2 and filters in answer, answer
