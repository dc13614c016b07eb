"""module_utils/_rgw/ (client, topic, notification) and the rgw_* modules without RGW: pure logic directly, RGW
calls with answers copied from the real RGW 16.2 of the local stack, and the modules' argument handling."""
import json
from xml.sax.saxutils import escape

import pytest
from ansible.module_utils.testing import patch_module_args
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw import client, notification, sns, topic
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._module import PublisherError
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.modules import rgw_bucket_notification, rgw_topic

ENDPOINT = "http://127.0.0.1:18000"
ARN = "arn:aws:sns:default::alice"
# GetTopicAttributes of a real RGW 16.2.15 (CreateTopic with verify-ssl=false, persistent=true, OpaqueData "a=b&c").
REAL_ENDPOINT_ARGS = (
    "Attributes.entry.1.key=push-endpoint&Attributes.entry.1.value=amqp://127.0.0.1:22010&"
    "Attributes.entry.2.key=amqp-exchange&Attributes.entry.2.value=notification&"
    "Attributes.entry.3.key=amqp-ack-level&Attributes.entry.3.value=broker&"
    "Attributes.entry.4.key=verify-ssl&Attributes.entry.4.value=false&"
    "Attributes.entry.5.key=persistent&Attributes.entry.5.value=true&"
    "Attributes.entry.6.key=OpaqueData&Attributes.entry.6.value=a=b&c&OpaqueData=a=b&c&Version=2010-03-31&"
    "amqp-ack-level=broker&amqp-exchange=notification&persistent=true&push-endpoint=amqp://127.0.0.1:22010&"
    "verify-ssl=false")
REAL_ATTRIBUTES = {
    "User": "", "Name": "alice", "TopicArn": ARN, "OpaqueData": "a=b&c",
    "EndPoint": json.dumps({"EndpointAddress": "amqp://127.0.0.1:22010", "EndpointArgs": REAL_ENDPOINT_ARGS,
                            "EndpointTopic": "alice", "HasStoredSecret": "false", "Persistent": "true"}),
}
REAL_TOPIC = dict(push_endpoint="amqp://127.0.0.1:22010", amqp_exchange="notification", amqp_ack_level="broker",
                  verify_ssl=False, ca_location="", persistent=True, opaque_data="a=b&c")


def params(**overrides):
    base = dict(endpoint_url=ENDPOINT, access_key="AK", access_key_file=None, secret_key="SK", secret_key_file=None,
                session_token=None, region="default", ca_bundle=None, validate_certs=True, assume_role_arn=None,
                role_session_name="cvmfs-publisher")
    base.update(overrides)
    return base


def topic_params(**overrides):
    base = params(name="alice", state="present", push_endpoint="amqp://127.0.0.1:22010",
                  amqp_exchange="notification", amqp_ack_level="broker", verify_ssl=False, persistent=True,
                  opaque_data="a=b&c")
    base.update(overrides)
    return base


def client_error(code, status, operation="CreateTopic", top_level=False, message=None):
    """A ClientError as botocore builds it; ``top_level`` is how RGW's SNS errors arrive (code outside Error)."""
    response = {"ResponseMetadata": {"HTTPStatusCode": status}}
    if top_level:
        response.update(Code=code, Message=message, Error={})
    else:
        response["Error"] = {"Code": code, "Message": message or ""}
    return ClientError(response, operation)


# -- masking ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, shown", [
    ("amqps://rgw:s3cr3t@mq.example.org:5671/vh", "amqps://rgw:********@mq.example.org:5671/vh"),
    ("amqp://rgw@mq:5672", "amqp://rgw@mq:5672"),
    ("amqp://127.0.0.1:5672", "amqp://127.0.0.1:5672"),
    ("amqp://u:p@ss@host", "amqp://u:********@host"),
    ("", ""),
])
def test_mask_url_userinfo_hides_only_the_password(url, shown):
    assert topic.mask_url_userinfo(url) == shown


def test_url_password_and_credentials():
    assert topic.url_password("amqps://rgw:s3cr3t@mq:5671") == "s3cr3t"
    assert topic.url_password("amqp://mq:5672") is None
    assert topic.url_password(None) is None
    assert topic.url_has_credentials("amqp://u:p@mq")
    assert not topic.url_has_credentials("amqp://mq:5672")


# -- topics: parsing RGW's answer and comparing -----------------------------------------------------------------

def test_parse_endpoint_args_keeps_flattened_attributes_only():
    args = topic.parse_endpoint_args(REAL_ENDPOINT_ARGS)
    assert args["amqp-exchange"] == "notification"
    assert args["verify-ssl"] == "false"
    assert args["push-endpoint"] == "amqp://127.0.0.1:22010"
    assert not any(key.startswith("Attributes.") or key == "Version" for key in args)


def test_topic_from_real_rgw_attributes():
    assert topic.topic_from_attributes(REAL_ATTRIBUTES) == REAL_TOPIC


def test_topic_from_attributes_applies_rgw_defaults():
    attributes = {"EndPoint": json.dumps({"EndpointAddress": "amqp://mq:5672",
                                          "EndpointArgs": "Version=2010-03-31&amqp-exchange=notification&"
                                                          "push-endpoint=amqp://mq:5672",
                                          "Persistent": "false"}), "OpaqueData": ""}
    canonical = topic.topic_from_attributes(attributes)
    assert canonical == dict(push_endpoint="amqp://mq:5672", amqp_exchange="notification", amqp_ack_level="broker",
                             verify_ssl=True, ca_location="", persistent=False, opaque_data="")


def test_desired_topic_round_trips_through_create_attributes():
    desired = topic.desired_topic(topic_params())
    assert desired == REAL_TOPIC
    attributes = topic.topic_create_attributes(desired)
    assert attributes == {"push-endpoint": "amqp://127.0.0.1:22010", "amqp-exchange": "notification",
                          "amqp-ack-level": "broker", "verify-ssl": "false", "persistent": "true",
                          "OpaqueData": "a=b&c"}
    assert "OpaqueData" not in topic.topic_create_attributes(dict(desired, opaque_data=""))


def test_ca_location_is_sent_read_back_and_compared():
    """RGW 16.2 takes the CA bundle it verifies an amqps broker with as the topic's `ca-location` attribute."""
    desired = topic.desired_topic(topic_params(push_endpoint="amqps://localhost:5671", verify_ssl=True,
                                             ca_location="/etc/ceph/broker-ca.pem"))
    attributes = topic.topic_create_attributes(desired)
    assert attributes["ca-location"] == "/etc/ceph/broker-ca.pem" and attributes["verify-ssl"] == "true"
    stored = {"EndPoint": json.dumps({"EndpointAddress": "amqps://localhost:5671", "Persistent": "true",
                                      "EndpointArgs": "Version=2010-03-31&amqp-ack-level=broker&"
                                                      "amqp-exchange=notification&ca-location=/etc/ceph/broker-ca.pem&"
                                                      "persistent=true&push-endpoint=amqps://localhost:5671&"
                                                      "verify-ssl=true"}), "OpaqueData": "a=b&c"}
    assert topic.topic_from_attributes(stored) == desired
    assert topic.topic_differences(dict(desired, ca_location=""), desired) == ["ca_location"]


def test_topic_differences_names_each_field():
    assert topic.topic_differences(REAL_TOPIC, REAL_TOPIC) == []
    changed = dict(REAL_TOPIC, persistent=False, amqp_ack_level="none")
    assert topic.topic_differences(REAL_TOPIC, changed) == ["amqp_ack_level", "persistent"]


def test_masked_topic_hides_password_and_keeps_the_rest():
    canonical = dict(REAL_TOPIC, push_endpoint="amqps://u:pw@mq:5671")
    shown = topic.masked_topic(canonical)
    assert shown["push_endpoint"] == "amqps://u:********@mq:5671"
    assert canonical["push_endpoint"] == "amqps://u:pw@mq:5671"  # the input is not modified
    assert topic.masked_topic(None) is None


# -- bucket notifications: normalising and merging ----------------------------------------------------------------

RGW_CONFIG = {"Id": "cvmfs-publisher", "TopicArn": ARN, "Events": ["s3:ObjectRemoved:*", "s3:ObjectCreated:*"],
              "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "cvmfs/"}]}}}


def notification_params(**overrides):
    base = dict(bucket="alice", id="cvmfs-publisher", state="present", topic_arn=ARN,
                events=["s3:ObjectCreated:*", "s3:ObjectRemoved:*"], prefix="cvmfs/", suffix=None)
    base.update(overrides)
    return base


def test_normalise_notification_sorts_events_and_reads_rule_names_in_any_case():
    aws_style = dict(RGW_CONFIG, Events=["s3:ObjectCreated:*", "s3:ObjectRemoved:*", "s3:ObjectCreated:*"],
                     Filter={"Key": {"FilterRules": [{"Name": "Prefix", "Value": "cvmfs/"},
                                                     {"Name": "Suffix", "Value": ".tar"}]}})
    assert notification.normalise_notification(aws_style) == dict(
        id="cvmfs-publisher", topic_arn=ARN, events=["s3:ObjectCreated:*", "s3:ObjectRemoved:*"], prefix="cvmfs/",
        suffix=".tar")
    assert notification.normalise_notification(RGW_CONFIG) == notification.desired_notification(notification_params())


def test_notification_config_round_trips():
    desired = notification.desired_notification(notification_params(suffix=".tar"))
    assert notification.normalise_notification(notification.notification_config(desired)) == desired
    no_filter = notification.desired_notification(notification_params(prefix=""))
    assert "Filter" not in notification.notification_config(no_filter)


def test_merge_notification_keeps_other_ids():
    other = {"Id": "audit", "TopicArn": "arn:aws:sns:default::audit", "Events": ["s3:ObjectCreated:Put"]}
    new = dict(RGW_CONFIG, Events=["s3:ObjectCreated:*"])
    assert notification.merge_notification([other, RGW_CONFIG], "cvmfs-publisher", new) == [other, new]
    assert notification.merge_notification([other, RGW_CONFIG], "cvmfs-publisher", None) == [other]
    assert notification.merge_notification([other], "cvmfs-publisher", new) == [other, new]


def test_clean_topic_configuration_drops_empty_filter_sections():
    config = dict(RGW_CONFIG, Filter={"Key": {"FilterRules": []}, "Metadata": {"FilterRules": []}})
    assert "Filter" not in notification.clean_topic_configuration(config)
    assert notification.clean_topic_configuration(RGW_CONFIG) == RGW_CONFIG


# -- errors, retries ----------------------------------------------------------------------------------------------

def test_describe_connection_error_says_unreachable():
    exc = EndpointConnectionError(endpoint_url="http://127.0.0.1:1/")
    assert client.describe_client_error(exc, "list topics", "http://127.0.0.1:1").startswith(
        "RGW unreachable at http://127.0.0.1:1 while trying to list topics")


@pytest.mark.parametrize("code, top_level", [("SignatureDoesNotMatch", False), ("InvalidAccessKeyId", False),
                                             ("SignatureDoesNotMatch", True)])
def test_describe_wrong_keys(code, top_level):
    exc = client_error(code, 403, top_level=top_level)
    assert client.describe_client_error(exc, "list topics").startswith("access denied: check access/secret key")


def test_describe_rgw_sns_error_uses_the_top_level_code():
    exc = client_error("InvalidInput", 400, top_level=True)
    assert client.error_code(exc) == "InvalidInput"
    assert client.describe_client_error(exc, "create topic alice") == (
        "RGW failed to create topic alice: InvalidInput (HTTP 400)")


def test_describe_access_denied_and_missing_credentials():
    exc = client_error("AccessDenied", 403, operation="Unlisted", message="Access Denied")
    assert client.describe_client_error(exc, "read bucket x") == (
        "access denied while trying to read bucket x: the RGW user lacks permission (AccessDenied: Access Denied "
        "(HTTP 403))")
    assert "set access_key/access_key_file" in client.describe_client_error(NoCredentialsError(), "list topics")


@pytest.mark.parametrize("operation, expected", [
    ("PutBucketNotificationConfiguration", "RGW identity 'AKPUB' lacks s3:PutBucketNotification (RGW 16.2 allows "
                                           "bucket notification calls to the bucket's owner only, whatever its policy "
                                           "says) (AccessDenied (HTTP 403))"),
    ("GetObject", "RGW identity 'AKPUB' lacks s3:GetObject (AccessDenied (HTTP 403))"),
    ("ListObjectsV2", "RGW identity 'AKPUB' lacks s3:ListBucket (AccessDenied (HTTP 403))"),
    ("PutObject", "RGW identity 'AKPUB' lacks s3:PutObject (AccessDenied (HTTP 403))"),
    ("CreateTopic", "RGW identity 'AKPUB' lacks sns:CreateTopic (AccessDenied (HTTP 403))"),
])
def test_access_denied_names_the_identity_and_the_right(operation, expected):
    exc = client_error("AccessDenied", 403, operation=operation)
    assert client.describe_client_error(exc, "do it", identity="AKPUB") == "access denied while trying to do it: " + \
        expected


@pytest.mark.parametrize("exc, retry", [
    (client_error("SlowDown", 503), True),
    (client_error("InternalError", 500), True),
    (client_error("Whatever", 502), True),
    (client_error("TooManyRequests", 429), True),
    (client_error("NoSuchBucket", 404), False),
    (client_error("AccessDenied", 403), False),
    (EndpointConnectionError(endpoint_url="http://x"), True),
    (ValueError("bug"), False),
])
def test_is_retryable(exc, retry):
    assert client.is_retryable(exc) is retry


def test_jittered_backoff_retries_transient_errors_then_gives_up():
    sleeps, calls = [], []

    @client.jittered_backoff(retries=3, delay=1, max_delay=2, sleep=sleeps.append)
    def flaky():
        calls.append(1)
        raise client_error("ServiceUnavailable", 503)

    with pytest.raises(ClientError):
        flaky()
    assert len(calls) == 4 and len(sleeps) == 3
    assert all(0 <= pause <= 2 for pause in sleeps)


def test_jittered_backoff_extra_codes_and_success():
    outcomes = [client_error("NoSuchBucket", 404), "done"]

    def step():
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    wrapped = client.jittered_backoff(retries=2, sleep=lambda _: None, catch_extra_error_codes=["NoSuchBucket"])(step)
    assert wrapped() == "done"
    not_retried = client.jittered_backoff(retries=2, sleep=lambda _: None)(
        lambda: (_ for _ in ()).throw(client_error("NoSuchBucket", 404)))
    with pytest.raises(ClientError):
        not_retried()


# -- clients ----------------------------------------------------------------------------------------------------

def test_a_connection_keeps_the_collection_settings_for_botocore(tmp_path):
    """What STS (AssumeRole) and a proxied HTTP stack get from botocore: the Config and the session's keys."""
    secret = tmp_path / "secret"
    secret.write_text("from-file\n")
    connection = client.Connection(params(secret_key=None, secret_key_file=str(secret), ca_bundle="/etc/ca.pem"),
                                   max_pool_connections=32, max_attempts=7)
    config = connection.config
    assert config.retries == {"mode": "standard", "max_attempts": 7}
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    assert config.max_pool_connections == 32
    assert connection.session.get_credentials().secret_key == "from-file"
    assert connection.credentials().secret_key == "from-file" and connection.verify == "/etc/ca.pem"


def test_a_connection_reports_an_unreadable_secret_file(tmp_path):
    with pytest.raises(PublisherError, match="cannot read RGW secret key from .*/missing"):
        client.Connection(params(secret_key=None, secret_key_file=str(tmp_path / "missing")))


# -- topic and notification operations against scripted RGW answers ------------------------------------------------
# The answers are those of the real RGW 16.2 of the local stack (its XML as sent). _rgw/transport.py's tests check
# that the requests are signed as botocore signs them; the integration tests send them to RGW.

SNS_NS = ' xmlns="https://sns.amazonaws.com/doc/2010-03-31/"'
META = "<ResponseMetadata><RequestId>490fb6bc.4108.1</RequestId></ResponseMetadata>"


def sns_answer(action, result=""):
    body = "<%sResult>%s</%sResult>" % (action, result, action) if result else ""
    return "<%sResponse%s>%s%s</%sResponse>" % (action, SNS_NS, body, META, action)


def error_answer(code, bucket=None):
    return ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>%s</Code><Message></Message>%s'
            "<RequestId>tx0000-default</RequestId><HostId>100c-default-default</HostId></Error>"
            % (code, "<BucketName>%s</BucketName>" % bucket if bucket else ""))


def topics_answer(*arns):
    """ListTopics as RGW 16.2 answers it (each member also carries User, Name, EndPoint, OpaqueData)."""
    members = "".join("<member><User></User><Name>%s</Name><EndPoint><EndpointAddress>amqp://127.0.0.1:22010"
                      "</EndpointAddress></EndPoint><TopicArn>%s</TopicArn><OpaqueData></OpaqueData></member>"
                      % (arn.rsplit(":", 1)[-1], arn) for arn in arns)
    return sns_answer("ListTopics", "<Topics>%s</Topics>" % members)


def attributes_answer(attributes):
    entries = "".join("<entry><key>%s</key><value>%s</value></entry>" % (escape(key), escape(value))
                      for key, value in attributes.items())
    return sns_answer("GetTopicAttributes", "<Attributes>%s</Attributes>" % entries)


class Answer:
    def __init__(self, status, content, headers=None):
        self.status_code, self.content, self.headers = status, content.encode("utf-8"), headers or {}


class ScriptedRgw(client.Connection):
    """A connection of the module_utils' own making whose signed requests get the answers a test scripted, in
    order: (operation, HTTP status, XML). The requests it was sent are in ``sent``."""

    def __init__(self):
        super().__init__(params())
        self.script, self.sent = [], []

    def answer(self, operation, content, status=200, headers=None):
        self.script.append((operation, status, content, headers))

    def signed_request(self, method, url, operation, stream=False, body=None, content_type=None, service="s3"):
        self.sent.append(dict(method=method, url=url, operation=operation, body=body, content_type=content_type,
                              service=service))
        assert self.script, "unexpected %s" % operation
        expected, status, content, headers = self.script.pop(0)
        assert operation == expected
        if status >= 300:
            raise client.client_error_from_http(Answer(status, content, headers), operation)
        return Answer(status, content, headers)


@pytest.fixture
def rgw():
    connection = ScriptedRgw()
    yield connection
    assert not connection.script, "answers left: %s" % connection.script


def expect_lookup(rgw, attributes):
    """ListTopics (with RGW's duplicate internal entry) then GetTopicAttributes, or its NoSuchEntity."""
    rgw.answer("ListTopics", topics_answer(ARN, ARN, "arn:aws:sns:default::alice2"))
    if attributes is None:
        rgw.answer("GetTopicAttributes", error_answer("NoSuchEntity"), 404)
    else:
        rgw.answer("GetTopicAttributes", attributes_answer(attributes))


def test_sns_requests_are_the_query_protocols_form():
    """What botocore's SNS client sends for CreateTopic: the form, percent-encoded, attributes as entries."""
    body = sns.form("CreateTopic", [("Name", "alice")] + sns.attribute_fields(
        {"push-endpoint": "amqp://u:p@mq:5672/v h", "OpaqueData": "a=b&c"}))
    assert body == (b"Action=CreateTopic&Version=2010-03-31&Name=alice&Attributes.entry.1.key=push-endpoint&"
                    b"Attributes.entry.1.value=amqp%3A%2F%2Fu%3Ap%40mq%3A5672%2Fv%20h&"
                    b"Attributes.entry.2.key=OpaqueData&Attributes.entry.2.value=a%3Db%26c")


def test_list_topics_follows_next_token(rgw):
    rgw.answer("ListTopics", sns_answer("ListTopics", "<Topics><member><TopicArn>arn:aws:sns:default::a"
                                                      "</TopicArn></member></Topics><NextToken>t2</NextToken>"))
    rgw.answer("ListTopics", topics_answer(ARN))
    rgw.answer("GetTopicAttributes", attributes_answer(REAL_ATTRIBUTES))
    assert topic.find_topic(rgw, "alice") == (ARN, REAL_ATTRIBUTES)
    assert rgw.sent[1]["body"] == b"Action=ListTopics&Version=2010-03-31&NextToken=t2"
    assert {(sent["method"], sent["url"], sent["service"], sent["content_type"]) for sent in rgw.sent} == {
        ("POST", ENDPOINT + "/", "sns", "application/x-www-form-urlencoded; charset=utf-8")}


def test_ensure_topic_unchanged_sends_a_persistent_topic_again_for_its_queue(rgw):
    """Nothing changes (changed=False), but a persistent topic's attributes are sent again: RGW re-creates the
    topic's queue if another user's DeleteTopic removed it (tests/integration/test_tenants.py shows that on RGW)."""
    expect_lookup(rgw, REAL_ATTRIBUTES)
    rgw.answer("CreateTopic", sns_answer("CreateTopic", "<TopicArn>%s</TopicArn>" % ARN))
    result = topic.ensure_topic(rgw, topic_params(), check_mode=False)
    assert result["changed"] is False and result["arn"] == ARN
    assert result["notifications_need_refresh"] is False and result["changed_attributes"] == []
    assert rgw.sent[-1]["body"] == sns.form("CreateTopic", [("Name", "alice")] + sns.attribute_fields(
        topic.topic_create_attributes(topic.desired_topic(topic_params()))))


def test_ensure_topic_unchanged_in_check_mode_sends_nothing(rgw):
    expect_lookup(rgw, REAL_ATTRIBUTES)
    result = topic.ensure_topic(rgw, topic_params(), check_mode=True)
    assert result["changed"] is False and result["arn"] == ARN


def test_ensure_topic_update_says_notifications_need_refresh(rgw):
    expect_lookup(rgw, REAL_ATTRIBUTES)
    rgw.answer("CreateTopic", sns_answer("CreateTopic", "<TopicArn>%s</TopicArn>" % ARN))
    result = topic.ensure_topic(rgw, topic_params(persistent=False), check_mode=False)
    assert result["changed"] and result["notifications_need_refresh"]
    assert result["changed_attributes"] == ["persistent"]
    assert result["diff"]["before"]["persistent"] is True and result["diff"]["after"]["persistent"] is False


def test_ensure_topic_check_mode_predicts_the_arn_and_writes_nothing(rgw):
    expect_lookup(rgw, None)  # only a stale internal entry left by an earlier DeleteTopic
    result = topic.ensure_topic(rgw, topic_params(), check_mode=True)
    assert result["changed"] and result["arn"] == ARN and result["diff"]["before"] is None


def test_ensure_topic_absent(rgw):
    expect_lookup(rgw, REAL_ATTRIBUTES)
    rgw.answer("DeleteTopic", sns_answer("DeleteTopic"))
    result = topic.ensure_topic(rgw, topic_params(state="absent"), check_mode=False)
    assert result["changed"] and result["diff"]["after"] is None
    assert rgw.sent[-1]["body"] == (b"Action=DeleteTopic&Version=2010-03-31&"
                                    b"TopicArn=arn%3Aaws%3Asns%3Adefault%3A%3Aalice")


def test_credentials_over_http_get_a_message_that_says_so(rgw):
    expect_lookup(rgw, None)
    rgw.answer("CreateTopic", error_answer("InvalidInput"), 400)
    with pytest.raises(PublisherError) as caught:
        topic.ensure_topic(rgw, topic_params(push_endpoint="amqp://rgw:s3cr3t@mq:5672"), check_mode=False)
    assert caught.value.msg.startswith(
        "RGW refused the topic: credentials in push_endpoint must be sent over HTTPS to RGW (endpoint_url is "
        "http://127.0.0.1:18000)")
    assert "s3cr3t" not in caught.value.msg


def test_topic_read_refused_over_http_mentions_stored_secrets(rgw):
    rgw.answer("ListTopics", error_answer("AccessDenied"), 403)
    with pytest.raises(PublisherError) as caught:
        topic.ensure_topic(rgw, topic_params(), check_mode=False)
    assert caught.value.msg.startswith("access denied while trying to list topics: RGW identity 'AK' lacks "
                                       "sns:ListTopics (AccessDenied (HTTP 403))")
    assert caught.value.msg.endswith("RGW also refuses topic reads over http when a topic stores push_endpoint "
                                     "credentials (use an https endpoint_url)")


def test_other_400_is_not_blamed_on_credentials(rgw):
    expect_lookup(rgw, None)
    rgw.answer("CreateTopic", error_answer("InvalidInput"), 400)
    with pytest.raises(PublisherError, match="^RGW failed to create topic alice: InvalidInput"):
        topic.ensure_topic(rgw, topic_params(), check_mode=False)


def test_a_transient_error_is_tried_again(rgw):
    rgw.answer("ListTopics", error_answer("ServiceUnavailable"), 503)
    expect_lookup(rgw, REAL_ATTRIBUTES)
    assert topic.find_topic(rgw, "alice")[0] == ARN


@pytest.mark.parametrize("operation, answer, said", [
    ("ListTopics", "<html><body><p>Please log in</p></body></html>",
     "RGW failed to list topics: MalformedAnswer: the answer is a <html> document, not RGW's <ListTopicsResponse>"),
    ("ListTopics", "", "RGW failed to list topics: MalformedAnswer: the answer is not XML (no element found: line 1, "
                       "column 0)"),
    ("GetBucketNotificationConfiguration", "<html><p>Please log in</p></html>",
     "RGW failed to read the notification configuration of bucket alice: MalformedAnswer: the answer is a <html> "
     "document, not RGW's <NotificationConfiguration>"),
])
def test_an_answer_that_is_not_rgws_is_a_clear_error_not_an_empty_answer(rgw, operation, answer, said):
    """A proxy's login page answered with HTTP 200 is not "no topics" or "no notifications"."""
    rgw.answer(operation, answer)
    with pytest.raises(PublisherError) as caught:
        if operation == "ListTopics":
            topic.ensure_topic(rgw, topic_params(), check_mode=False)
        else:
            notification.ensure_bucket_notification(rgw, notification_params(), check_mode=False)
    assert caught.value.msg == said + " (HTTP 200)"


def test_a_create_topic_answer_without_its_arn_is_an_error(rgw):
    expect_lookup(rgw, None)
    rgw.answer("CreateTopic", sns_answer("CreateTopic", "<Other/>"))
    with pytest.raises(PublisherError, match=r"^RGW failed to create topic alice: MalformedAnswer: the answer names "
                                             r"no TopicArn \(HTTP 200\)$"):
        topic.ensure_topic(rgw, topic_params(), check_mode=False)


@pytest.mark.parametrize("status, headers, said", [
    (404, None, "RGW failed to list topics: 404: Not Found (HTTP 404)"),
    (301, {"Location": "https://rgw.example.org/"}, "RGW failed to list topics: 301: Moved Permanently to "
                                                    "https://rgw.example.org/ (HTTP 301)"),
])
def test_an_error_page_without_rgws_xml_is_named_by_its_http_reason(rgw, status, headers, said):
    rgw.answer("ListTopics", "<html><body><h1>%d</h1></body></html>" % status, status, headers)
    with pytest.raises(PublisherError) as caught:
        topic.ensure_topic(rgw, topic_params(), check_mode=False)
    assert caught.value.msg == said


def test_an_answer_that_is_not_xml_is_a_clear_error(rgw):
    rgw.answer("ListTopics", "<html>proxy error</h")
    with pytest.raises(PublisherError, match=r"^RGW failed to list topics: MalformedAnswer: the answer is not XML "
                                             r"\(unclosed token: line 1, column 17\) \(HTTP 200\)$"):
        topic.ensure_topic(rgw, topic_params(), check_mode=False)


AUDIT = {"Id": "audit", "TopicArn": "arn:aws:sns:default::audit", "Events": ["s3:ObjectCreated:Put"],
         "Filter": {"Metadata": {"FilterRules": [{"Name": "x-amz-meta-team", "Value": "cms"}]}}}
# GetBucketNotificationConfiguration of RGW 16.2 (no namespace; the Filter before the Events; RGW's own sections).
AUDIT_XML = ("<TopicConfiguration><Id>audit</Id><Topic>arn:aws:sns:default::audit</Topic><Filter><S3Key/>"
             "<S3Metadata><FilterRule><Name>x-amz-meta-team</Name><Value>cms</Value></FilterRule></S3Metadata>"
             "<S3Tags/></Filter><Event>s3:ObjectCreated:Put</Event></TopicConfiguration>")
MINE_XML = ("<TopicConfiguration><Id>cvmfs-publisher</Id><Topic>arn:aws:sns:default::alice</Topic><Filter><S3Key>"
            "<FilterRule><Name>prefix</Name><Value>cvmfs/</Value></FilterRule></S3Key></Filter>"
            "<Event>s3:ObjectRemoved:*</Event><Event>s3:ObjectCreated:*</Event></TopicConfiguration>")


def configuration_answer(*configurations):
    return "<NotificationConfiguration>%s</NotificationConfiguration>" % "".join(configurations)


def test_notification_configurations_read_as_boto3_reads_them():
    assert notification.parse_topic_configurations(configuration_answer(AUDIT_XML, MINE_XML).encode()) == [
        AUDIT, RGW_CONFIG]


def test_notification_unchanged_when_only_event_order_differs(rgw):
    rgw.answer("GetBucketNotificationConfiguration", configuration_answer(AUDIT_XML, MINE_XML))
    result = notification.ensure_bucket_notification(rgw, notification_params(), check_mode=False)
    assert result["changed"] is False and result["other_ids"] == ["audit"]
    assert rgw.sent[0]["method"] == "GET" and rgw.sent[0]["url"] == ENDPOINT + "/alice?notification"


def test_notification_added_next_to_other_ids_keeps_their_filters(rgw):
    rgw.answer("GetBucketNotificationConfiguration", configuration_answer(AUDIT_XML))
    rgw.answer("PutBucketNotificationConfiguration", "")
    result = notification.ensure_bucket_notification(rgw, notification_params(), check_mode=False)
    assert result["changed"] and result["diff"]["before"] is None
    assert result["notification"]["events"] == ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]
    put = rgw.sent[-1]
    assert (put["method"], put["url"]) == ("PUT", ENDPOINT + "/alice?notification")
    assert put["body"] == (
        b'<NotificationConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><TopicConfiguration>'
        b"<Id>audit</Id><Topic>arn:aws:sns:default::audit</Topic><Event>s3:ObjectCreated:Put</Event><Filter>"
        b"<S3Metadata><FilterRule><Name>x-amz-meta-team</Name><Value>cms</Value></FilterRule></S3Metadata></Filter>"
        b"</TopicConfiguration><TopicConfiguration><Id>cvmfs-publisher</Id><Topic>arn:aws:sns:default::alice</Topic>"
        b"<Event>s3:ObjectCreated:*</Event><Event>s3:ObjectRemoved:*</Event><Filter><S3Key><FilterRule><Name>prefix"
        b"</Name><Value>cvmfs/</Value></FilterRule></S3Key></Filter></TopicConfiguration></NotificationConfiguration>")
    assert notification.parse_topic_configurations(put["body"]) == [
        AUDIT, dict(RGW_CONFIG, Events=["s3:ObjectCreated:*", "s3:ObjectRemoved:*"])]


def test_notification_topic_change_deletes_the_id_first(rgw):
    rgw.answer("GetBucketNotificationConfiguration", configuration_answer(MINE_XML))
    rgw.answer("DeleteBucketNotification", "")
    rgw.answer("GetBucketNotificationConfiguration", configuration_answer())
    rgw.answer("PutBucketNotificationConfiguration", "")
    new_arn = "arn:aws:sns:default::alice-v2"
    result = notification.ensure_bucket_notification(rgw, notification_params(topic_arn=new_arn), check_mode=False)
    assert result["changed"] and result["notification"]["topic_arn"] == new_arn
    assert rgw.sent[1]["method"] == "DELETE" and rgw.sent[1]["url"] == ENDPOINT + "/alice?notification=cvmfs-publisher"


def test_notification_check_mode_writes_nothing(rgw):
    rgw.answer("GetBucketNotificationConfiguration", configuration_answer(MINE_XML))
    result = notification.ensure_bucket_notification(rgw, notification_params(prefix="other/"), check_mode=True)
    assert result["changed"]
    assert result["diff"]["before"]["prefix"] == "cvmfs/" and result["diff"]["after"]["prefix"] == "other/"


def test_missing_bucket_is_named(rgw):
    rgw.answer("GetBucketNotificationConfiguration", error_answer("NoSuchBucket", "alice"), 404)
    with pytest.raises(PublisherError, match="^bucket 'alice' does not exist at http://127.0.0.1:18000"):
        notification.ensure_bucket_notification(rgw, notification_params(), check_mode=False)


def test_absent_on_a_missing_bucket_is_no_change(rgw):
    rgw.answer("GetBucketNotificationConfiguration", error_answer("NoSuchBucket", "alice"), 404)
    result = notification.ensure_bucket_notification(rgw, notification_params(state="absent"), check_mode=False)
    assert result["changed"] is False and result["bucket_exists"] is False


def test_a_refused_notification_write_says_what_rgw_said(rgw):
    rgw.answer("GetBucketNotificationConfiguration", configuration_answer())
    rgw.answer("PutBucketNotificationConfiguration", error_answer("MalformedXML", "alice"), 400)
    with pytest.raises(PublisherError, match=r"^RGW failed to write the notification configuration of bucket "
                                             r"alice: MalformedXML \(HTTP 400\)$"):
        notification.ensure_bucket_notification(rgw, notification_params(), check_mode=False)


# -- modules: argument handling and secrets ---------------------------------------------------------------------

def run_main(module, args, capsys):
    with patch_module_args(args):
        with pytest.raises(SystemExit):
            module.main()
    return json.loads(capsys.readouterr().out)


def test_topic_present_needs_push_endpoint(capsys):
    result = run_main(rgw_topic, dict(endpoint_url=ENDPOINT, name="alice"), capsys)
    assert result["failed"] and "push_endpoint" in result["msg"]


def test_topic_refuses_both_secret_and_secret_file(capsys):
    result = run_main(rgw_topic, dict(endpoint_url=ENDPOINT, name="alice", push_endpoint="amqp://mq",
                                      secret_key="long-secret", secret_key_file="/x"), capsys)
    assert result["failed"] and "mutually exclusive: secret_key|secret_key_file" in result["msg"]


def test_topic_result_never_shows_the_push_endpoint_password(capsys, monkeypatch):
    def fake_ensure(sns, module_params, check_mode):
        # As if a bug echoed the raw option: the module's no_log_values must still hide the password.
        return dict(changed=True, echoed=module_params["push_endpoint"], diff=dict(before=None, after=None))

    monkeypatch.setattr(rgw_topic, "Connection", lambda *args, **kwargs: None)
    monkeypatch.setattr(rgw_topic, "ensure_topic", fake_ensure)
    result = run_main(rgw_topic, dict(endpoint_url=ENDPOINT, name="alice", secret_key="topsecretkey",
                                      push_endpoint="amqps://rgw:Pa55w0rd-x@mq:5671"), capsys)
    text = json.dumps(result)
    assert "Pa55w0rd-x" not in text and "topsecretkey" not in text
    assert result["echoed"] == "amqps://rgw:********@mq:5671"


def test_notification_present_needs_topic_arn_and_events(capsys):
    result = run_main(rgw_bucket_notification, dict(endpoint_url=ENDPOINT, bucket="alice"), capsys)
    assert result["failed"] and "topic_arn" in result["msg"]
    result = run_main(rgw_bucket_notification, dict(endpoint_url=ENDPOINT, bucket="alice", topic_arn=ARN, events=[]),
                      capsys)
    assert result["failed"] and result["msg"].startswith("events must list at least one S3 event type")


# -- documentation (of the three modules of this area, amqp_queue included) ------------------------------------

@pytest.mark.parametrize("module_name", ["rgw_topic", "rgw_bucket_notification", "amqp_queue"])
def test_documentation_parses_and_matches_the_argument_spec(module_name):
    """ansible-doc refuses a module whose YAML does not parse; options must match what the module accepts."""
    import importlib

    import yaml
    module = importlib.import_module("ansible_collections.infn_cloud.cvmfs_publisher.plugins.modules." + module_name)
    doc = yaml.safe_load(module.DOCUMENTATION)
    yaml.safe_load(module.EXAMPLES)
    yaml.safe_load(module.RETURN)
    documented = set(doc["options"])
    for fragment in doc["extends_documentation_fragment"]:
        fragment_module = importlib.import_module("ansible_collections.infn_cloud.cvmfs_publisher.plugins."
                                                  "doc_fragments." + fragment.rsplit(".", 1)[1])
        documented |= set(yaml.safe_load(fragment_module.ModuleDocFragment.DOCUMENTATION)["options"])
    option_set = client.RGW_ARGUMENT_SPEC if module_name.startswith("rgw") else amqp_queue_spec()
    assert documented == set(module.ARGUMENT_SPEC) | set(option_set) | set(BATCH_ARGUMENT_SPEC)


BATCH_ARGUMENT_SPEC = {"batch": None}  # module_utils/_module.py, documented by doc_fragments/batch.py


def amqp_queue_spec():
    from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rabbitmq import RABBITMQ_ARGUMENT_SPEC
    return RABBITMQ_ARGUMENT_SPEC
