"""rgw_topic against the local stack's real Ceph RGW 16.2, run through ansible as an operator does."""
import json
import socket

import pytest
from botocore.exceptions import ClientError

from helpers import run_module

MODULE = "infn_cloud.cvmfs_publisher.rgw_topic"
CONNECTION = dict(endpoint_url="{{ cvmfs_publisher_rgw_endpoint }}",
                  access_key_file="{{ cvmfs_publisher_rgw_access_key_file }}",
                  secret_key_file="{{ cvmfs_publisher_rgw_secret_key_file }}")
PUSH = "{{ cvmfs_publisher_topic_push_endpoint }}"


def endpoint_of(sns, arn):
    try:
        attributes = sns.get_topic_attributes(TopicArn=arn)["Attributes"]
    except ClientError as exc:
        if exc.response["ResponseMetadata"]["HTTPStatusCode"] == 404:
            return None
        raise
    return json.loads(attributes["EndPoint"])


def arn_of(name):
    return "arn:aws:sns:default::%s" % name


def test_create_idempotent_update_delete(stack, sns, unique_name):
    args = dict(CONNECTION, name=unique_name, push_endpoint=PUSH)
    rc, created = run_module(MODULE, args, diff=True)
    assert rc == 0 and created["changed"], created
    assert created["arn"] == arn_of(unique_name)
    assert created["diff"]["before"] is None and created["notifications_need_refresh"] is False
    endpoint = endpoint_of(sns, created["arn"])
    assert endpoint["EndpointAddress"] == stack["TOPIC_PUSH_ENDPOINT"]
    assert "amqp-exchange=notification" in endpoint["EndpointArgs"]

    rc, again = run_module(MODULE, args)
    assert rc == 0 and again["changed"] is False and again["arn"] == created["arn"], again

    assert endpoint["Persistent"] == "true"  # the default: events survive a broker outage
    updated_args = dict(args, persistent=False, amqp_ack_level="none", opaque_data="alice.infn.it")
    rc, updated = run_module(MODULE, updated_args, diff=True)
    assert rc == 0 and updated["changed"] and updated["notifications_need_refresh"] is True, updated
    assert updated["changed_attributes"] == ["amqp_ack_level", "opaque_data", "persistent"]
    assert updated["diff"]["before"]["persistent"] is True and updated["diff"]["after"]["persistent"] is False
    assert endpoint_of(sns, created["arn"])["Persistent"] == "false"
    rc, updated_again = run_module(MODULE, updated_args)
    assert rc == 0 and updated_again["changed"] is False, updated_again

    rc, deleted = run_module(MODULE, dict(CONNECTION, name=unique_name, state="absent"), diff=True)
    assert rc == 0 and deleted["changed"] and deleted["diff"]["after"] is None
    assert endpoint_of(sns, created["arn"]) is None
    rc, deleted_again = run_module(MODULE, dict(CONNECTION, name=unique_name, state="absent"))
    assert rc == 0 and deleted_again["changed"] is False


def test_check_mode_predicts_and_changes_nothing(sns, unique_name):
    args = dict(CONNECTION, name=unique_name, push_endpoint=PUSH)
    rc, predicted = run_module(MODULE, args, check=True, diff=True)
    assert rc == 0 and predicted["changed"] and predicted["arn"] == arn_of(unique_name), predicted
    assert endpoint_of(sns, arn_of(unique_name)) is None

    assert run_module(MODULE, args)[1]["changed"]
    rc, update_predicted = run_module(MODULE, dict(args, verify_ssl=False), check=True)
    assert rc == 0 and update_predicted["changed"] and update_predicted["notifications_need_refresh"]
    assert "verify-ssl=false" not in endpoint_of(sns, arn_of(unique_name))["EndpointArgs"]
    rc, delete_predicted = run_module(MODULE, dict(CONNECTION, name=unique_name, state="absent"), check=True)
    assert rc == 0 and delete_predicted["changed"] and endpoint_of(sns, arn_of(unique_name)) is not None


def test_password_in_push_endpoint_is_masked_everywhere(unique_name):
    """In check mode nothing is sent to RGW, so the diff and the echoed options can be inspected."""
    push = "amqps://rgw-events:Hidden-Pw-42@127.0.0.1:5671"
    rc, result = run_module(MODULE, dict(CONNECTION, name=unique_name, push_endpoint=push), check=True, diff=True)
    assert rc == 0 and result["changed"], result
    assert result["diff"]["after"]["push_endpoint"] == "amqps://rgw-events:********@127.0.0.1:5671"
    assert result["topic"]["push_endpoint"] == "amqps://rgw-events:********@127.0.0.1:5671"
    assert "Hidden-Pw-42" not in json.dumps(result)


def test_credentials_in_push_endpoint_over_http_are_explained(stack, sns, unique_name):
    push = "amqp://rgw-events:Hidden-Pw-43@127.0.0.1:%s" % stack["AMQP_PORT"]
    rc, result = run_module(MODULE, dict(CONNECTION, name=unique_name, push_endpoint=push))
    assert rc != 0
    assert result["msg"].startswith(
        "RGW refused the topic: credentials in push_endpoint must be sent over HTTPS to RGW (endpoint_url is %s)"
        % stack["RGW_ENDPOINT"]), result["msg"]
    assert "Hidden-Pw-43" not in json.dumps(result)
    assert endpoint_of(sns, arn_of(unique_name)) is None


def test_rgw_unreachable(unique_name):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rc, result = run_module(MODULE, dict(CONNECTION, name=unique_name, push_endpoint=PUSH,
                                         endpoint_url="http://127.0.0.1:%d" % port))
    assert rc != 0
    assert result["msg"].startswith("RGW unreachable at http://127.0.0.1:%d" % port), result["msg"]


def test_wrong_secret_key(unique_name):
    args = dict(CONNECTION, name=unique_name, push_endpoint=PUSH, secret_key="Wrong-Secret-Key-0")
    del args["secret_key_file"]
    rc, result = run_module(MODULE, args)
    assert rc != 0
    assert result["msg"].startswith("access denied: check access/secret key"), result["msg"]
    assert "Wrong-Secret-Key-0" not in json.dumps(result)


@pytest.mark.parametrize("missing", ["push_endpoint"])
def test_present_without_push_endpoint_is_refused(unique_name, missing):
    rc, result = run_module(MODULE, dict(CONNECTION, name=unique_name))
    assert rc != 0 and missing in result["msg"]
