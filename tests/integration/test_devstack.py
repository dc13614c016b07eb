"""The local stack is real: S3 on RGW, AMQP through the exchange, a read-only AppRole, and RGW bucket notifications
reaching RabbitMQ (the pipeline the publisher relies on). Plus the stack command's own contract and the test helpers."""
import json
import os
import re
import subprocess
import time
from pathlib import Path

import hvac
import hvac.exceptions
import pika
import pytest
import yaml

from helpers import amqp_parameters, run_module, run_playbook

ENV_KEYS = [
    "DEVSTACK_DIR", "RGW_ENDPOINT", "RGW_REGION", "RGW_ACCESS_KEY_FILE", "RGW_SECRET_KEY_FILE", "RGW_TENANT_USERS",
    "AMQP_HOST",
    "AMQP_PORT", "AMQP_USER", "AMQP_PASSWORD_FILE", "AMQP_VHOST", "RABBITMQ_API_URL", "RABBITMQ_API_USER",
    "RABBITMQ_API_PASSWORD_FILE", "AMQP_DASHBOARD_USER", "AMQP_DASHBOARD_PASSWORD_FILE", "AMQP_RGW_USER",
    "AMQP_RGW_PASSWORD_FILE", "RABBITMQ_ADMIN_USER", "RABBITMQ_ADMIN_PASSWORD_FILE", "AMQP_EXCHANGE",
    "AMQP_PROVISIONING_EXCHANGE",
    "TOPIC_PUSH_ENDPOINT", "VAULT_ADDR", "VAULT_TOKEN_FILE", "VAULT_ROLE_ID_FILE", "VAULT_SECRET_ID_FILE",
    "VAULT_KV_MOUNT", "CVMFS_STANDIN_ROOT", "CVMFS_SERVER_BIN", "CVMFS_STRATUM0_URL", "CVMFS_GATEWAY_URL", "TLS",
    "CA_CERT_FILE",
]
ROLE_VARS = [
    "cvmfs_publisher_vault_url", "cvmfs_publisher_vault_ca_cert", "cvmfs_publisher_vault_role_id_file",
    "cvmfs_publisher_vault_secret_id_file", "cvmfs_publisher_vault_kv_mount", "cvmfs_publisher_rgw_endpoint",
    "cvmfs_publisher_rgw_region", "cvmfs_publisher_rgw_access_key_file", "cvmfs_publisher_rgw_secret_key_file",
    "cvmfs_publisher_rgw_ca_bundle", "cvmfs_publisher_rabbitmq_api_url", "cvmfs_publisher_rabbitmq_user",
    "cvmfs_publisher_rabbitmq_password_file", "cvmfs_publisher_amqp_user", "cvmfs_publisher_amqp_password_file",
    "cvmfs_publisher_rabbitmq_vhost", "cvmfs_publisher_rabbitmq_ca_cert",
    "cvmfs_publisher_amqp_exchange", "cvmfs_publisher_topic_push_endpoint", "cvmfs_publisher_topic_ack_level",
    "cvmfs_publisher_topic_persistent", "cvmfs_publisher_topic_ca_location", "cvmfs_publisher_cvmfs_server_bin",
    "cvmfs_publisher_cvmfs_root", "cvmfs_publisher_stratum0_url", "cvmfs_publisher_gateway_url",
    "cvmfs_publisher_txn_dir", "cvmfs_publisher_owner",
]
# Waiting for an asynchronous delivery: a bound on polling, not a measured threshold.
DELIVERY_DEADLINE = 60


def stack_cmd(repo_root, *args, env=None):
    return subprocess.run([str(repo_root / "devstack" / "stack"), *args], capture_output=True, text=True,
                          timeout=120, env=env)


def read(path):
    return Path(path).read_text().strip()


@pytest.fixture
def amqp(stack):
    """The broker as its administrator: these tests bind private queues to the notification exchange and publish
    on it, which no client identity of the stack may do (tests/integration/test_rights.py)."""
    connection = pika.BlockingConnection(amqp_parameters(stack, "admin"))
    yield connection.channel()
    connection.close()


def bind_queue(channel, stack, name):
    """A private queue bound to the exchange by routing key `name` (the convention: routing key = short name)."""
    channel.queue_declare(queue=name, exclusive=True, auto_delete=True)
    channel.queue_bind(queue=name, exchange=stack["AMQP_EXCHANGE"], routing_key=name)


def get_messages(channel, queue, count):
    deadline = time.monotonic() + DELIVERY_DEADLINE
    bodies = []
    while len(bodies) < count and time.monotonic() < deadline:
        method, _, body = channel.basic_get(queue=queue, auto_ack=True)
        if method is None:
            time.sleep(0.1)
        else:
            bodies.append(body)
    return bodies


def approle_client(stack):
    client = hvac.Client(url=stack["VAULT_ADDR"])
    client.auth.approle.login(role_id=read(stack["VAULT_ROLE_ID_FILE"]),
                              secret_id=read(stack["VAULT_SECRET_ID_FILE"]))
    return client


# -- the services ---------------------------------------------------------------------------------------------------


def test_s3_put_get_list(s3, unique_name):
    s3.create_bucket(Bucket=unique_name)
    s3.put_object(Bucket=unique_name, Key="cvmfs/dir/a.txt", Body=b"alpha")
    s3.put_object(Bucket=unique_name, Key="cvmfs/b.txt", Body=b"beta")

    assert s3.get_object(Bucket=unique_name, Key="cvmfs/dir/a.txt")["Body"].read() == b"alpha"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=unique_name, Prefix="cvmfs/")["Contents"]]
    assert keys == ["cvmfs/b.txt", "cvmfs/dir/a.txt"]


def test_amqp_message_routed_by_routing_key(stack, amqp, unique_name):
    bind_queue(amqp, stack, unique_name)
    amqp.basic_publish(exchange=stack["AMQP_EXCHANGE"], routing_key=unique_name + "-other", body=b"not for us")
    amqp.basic_publish(exchange=stack["AMQP_EXCHANGE"], routing_key=unique_name, body=b"hello")

    assert get_messages(amqp, unique_name, 1) == [b"hello"]
    assert amqp.basic_get(queue=unique_name, auto_ack=True)[0] is None


def test_exchange_is_a_durable_topic_exchange(stack, amqp):
    # passive declare fails (and closes the channel) if it does not exist or differs
    amqp.exchange_declare(exchange=stack["AMQP_EXCHANGE"], exchange_type="topic", durable=True, passive=True)


def test_approle_reads_seeded_keys_only(stack, repo_root, unique_name):
    fqrn = unique_name + ".infn.it"
    subject = "sub-" + unique_name
    seeded = stack_cmd(repo_root, "seed-keys", fqrn, "--subject", subject)
    assert seeded.returncode == 0, seeded.stderr
    assert "%s/cvmfs_keys/%s" % (subject, fqrn) in seeded.stdout

    client = approle_client(stack)
    keys = client.secrets.kv.v2.read_secret_version(
        path="%s/cvmfs_keys/%s" % (subject, fqrn), mount_point=stack["VAULT_KV_MOUNT"],
        raise_on_deleted_version=True)["data"]["data"]
    assert sorted(keys) == ["certificateKey", "gatewayKey", "publicKey"]
    assert keys["certificateKey"].startswith("-----BEGIN CERTIFICATE-----")
    assert keys["publicKey"].startswith("-----BEGIN PUBLIC KEY-----")
    assert re.match(r"^plain_text keygw%s \S+\n?$" % unique_name, keys["gatewayKey"])
    for secret in keys.values():  # key material is never printed
        assert secret.strip() not in seeded.stdout + seeded.stderr

    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.kv.v2.create_or_update_secret(path="%s/cvmfs_keys/%s" % (subject, fqrn),
                                                     secret={"gatewayKey": "x"},
                                                     mount_point=stack["VAULT_KV_MOUNT"])
    with pytest.raises(hvac.exceptions.Forbidden):  # the dev server's own KV mount
        client.secrets.kv.v2.read_secret_version(path="anything", mount_point="secret",
                                                 raise_on_deleted_version=True)
    with pytest.raises(hvac.exceptions.Forbidden):
        client.sys.list_acl_policies()


def test_seed_keys_for_a_group(stack, repo_root, unique_name):
    fqrn = unique_name + ".infn.it"
    seeded = stack_cmd(repo_root, "seed-keys", fqrn, "--group", "g" + unique_name)
    assert seeded.returncode == 0, seeded.stderr

    keys = approle_client(stack).secrets.kv.v2.read_secret_version(
        path="groups/g%s/cvmfs_keys/%s" % (unique_name, fqrn), mount_point=stack["VAULT_KV_MOUNT"],
        raise_on_deleted_version=True)["data"]["data"]
    assert sorted(keys) == ["certificateKey", "gatewayKey", "publicKey"]


def test_bucket_notifications_reach_rabbitmq(stack, s3, sns, amqp, unique_name):
    bind_queue(amqp, stack, unique_name)
    topic_arn = sns.create_topic(Name=unique_name, Attributes={
        "push-endpoint": stack["TOPIC_PUSH_ENDPOINT"], "amqp-exchange": stack["AMQP_EXCHANGE"],
        "amqp-ack-level": "broker"})["TopicArn"]
    s3.create_bucket(Bucket=unique_name)
    s3.put_bucket_notification_configuration(Bucket=unique_name, NotificationConfiguration={
        "TopicConfigurations": [{"Id": "cvmfs-publisher", "TopicArn": topic_arn,
                                 "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]}]})
    try:
        s3.put_object(Bucket=unique_name, Key="cvmfs/hello.txt", Body=b"hello")
        created = [json.loads(b) for b in get_messages(amqp, unique_name, 1)]
        assert len(created) == 1
        record = created[0]["Records"][0]
        assert record["eventName"] == "ObjectCreated:Put"
        assert record["s3"]["bucket"]["name"] == unique_name
        assert record["s3"]["object"]["key"] == "cvmfs/hello.txt"

        # DeleteObjects in a bucket with notifications aborts radosgw under the beast frontend (RGW notes, gotcha 12):
        # the stack runs civetweb, so RGW survives and sends one removal event per key.
        s3.put_object(Bucket=unique_name, Key="cvmfs/second.txt", Body=b"2")
        assert len(get_messages(amqp, unique_name, 1)) == 1
        deleted = s3.delete_objects(Bucket=unique_name, Delete={"Objects": [{"Key": "cvmfs/hello.txt"},
                                                                            {"Key": "cvmfs/second.txt"}]})
        assert len(deleted["Deleted"]) == 2
        removed = [json.loads(b)["Records"][0] for b in get_messages(amqp, unique_name, 2)]
        assert sorted((r["eventName"], r["s3"]["object"]["key"]) for r in removed) == [
            ("ObjectRemoved:Delete", "cvmfs/hello.txt"), ("ObjectRemoved:Delete", "cvmfs/second.txt")]
        assert s3.list_objects_v2(Bucket=unique_name)["KeyCount"] == 0
    finally:
        sns.delete_topic(TopicArn=topic_arn)


# -- the stack command ----------------------------------------------------------------------------------------------


@pytest.mark.tls
def test_env_json_has_exactly_the_contract_keys(stack, repo_root):
    assert list(stack) == ENV_KEYS
    shell = stack_cmd(repo_root, "env")
    assert shell.returncode == 0
    exported = dict(re.match(r"^export (\w+)='(.*)'$", line).groups() for line in shell.stdout.splitlines())
    assert exported == stack


def test_secret_files_are_private(stack):
    for key in ("RGW_ACCESS_KEY_FILE", "RGW_SECRET_KEY_FILE", "AMQP_PASSWORD_FILE", "VAULT_TOKEN_FILE",
                "VAULT_ROLE_ID_FILE", "VAULT_SECRET_ID_FILE"):
        mode = os.stat(stack[key]).st_mode & 0o777
        assert mode == 0o600, "%s is %o" % (stack[key], mode)
        assert read(stack[key])


@pytest.mark.tls
def test_vars_file_points_at_the_stack(stack, repo_root):
    proc = stack_cmd(repo_root, "vars")
    assert proc.returncode == 0, proc.stderr
    role_vars = yaml.safe_load(Path(proc.stdout.strip()).read_text())
    assert list(role_vars) == ROLE_VARS
    assert role_vars["cvmfs_publisher_vault_url"] == stack["VAULT_ADDR"]
    assert role_vars["cvmfs_publisher_rgw_endpoint"] == stack["RGW_ENDPOINT"]
    assert role_vars["cvmfs_publisher_topic_push_endpoint"] == stack["TOPIC_PUSH_ENDPOINT"]
    assert role_vars["cvmfs_publisher_topic_persistent"] is True
    tls = stack["TLS"] == "true"
    assert stack["CA_CERT_FILE"] if tls else stack["CA_CERT_FILE"] == ""
    for name in ("vault_ca_cert", "rgw_ca_bundle", "rabbitmq_ca_cert", "topic_ca_location"):
        assert role_vars["cvmfs_publisher_" + name] == stack["CA_CERT_FILE"], name
    for name in ("VAULT_ADDR", "RGW_ENDPOINT", "RABBITMQ_API_URL"):
        assert stack[name].startswith("https://" if tls else "http://"), name
    assert role_vars["cvmfs_publisher_txn_dir"] == "/srv/cvmfs/{fqrn}/data/txn"
    assert role_vars["cvmfs_publisher_cvmfs_server_bin"] == stack["CVMFS_SERVER_BIN"]
    wrapper = Path(stack["CVMFS_SERVER_BIN"]).read_text()
    assert "CVMFS_STANDIN_ROOT='%s'" % stack["CVMFS_STANDIN_ROOT"] in wrapper
    assert str(repo_root / "devstack" / "cvmfs_server") in wrapper


def test_status_and_up_on_a_running_stack(repo_root):
    status = stack_cmd(repo_root, "status")
    assert status.returncode == 0
    assert len(re.findall(r"^\s+\S+\s+up\s+pid \d+", status.stdout, re.M)) == 6
    again = stack_cmd(repo_root, "up")
    assert again.returncode == 0
    assert "already up" in again.stdout


def test_up_names_the_busy_port_and_service(stack, repo_root, tmp_path):
    env = dict(os.environ, DEVSTACK_DIR=str(tmp_path / "other"),
               DEVSTACK_PORT_BASE=str(int(stack["RGW_ENDPOINT"].rsplit(":", 1)[1])))
    proc = stack_cmd(repo_root, "up", env=env)
    assert proc.returncode == 1
    assert "%s (Ceph RGW (S3))" % stack["RGW_ENDPOINT"].rsplit(":", 1)[1] in proc.stderr
    assert "already in use" in proc.stderr
    assert not (tmp_path / "other").exists()


def test_down_refuses_to_delete_a_folder_that_is_not_a_stack(repo_root, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    proc = stack_cmd(repo_root, "down", env=dict(os.environ, DEVSTACK_DIR=str(tmp_path)))
    assert proc.returncode == 1
    assert "does not look like a stack folder" in proc.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_seed_keys_rejects_a_short_repository_name(stack, repo_root):
    proc = stack_cmd(repo_root, "seed-keys", "alice", "--subject", "s")
    assert proc.returncode == 1
    assert "expected a fully qualified name" in proc.stderr


# -- the test helpers -----------------------------------------------------------------------------------------------


def test_run_module_returns_the_registered_result(stack, tmp_path):
    rc, result = run_module("ansible.builtin.stat", {"path": "{{ cvmfs_publisher_cvmfs_root }}"})
    assert rc == 0
    assert result["stat"]["isdir"] is True
    assert result["stat"]["path"] == stack["CVMFS_STANDIN_ROOT"]

    target = tmp_path / "f.txt"
    rc, result = run_module("ansible.builtin.copy", {"content": "x\n", "dest": str(target)}, check=True, diff=True)
    assert (rc, result["changed"]) == (0, True)
    assert result["diff"][0]["after"] == "x\n"
    assert not target.exists()

    rc, result = run_module("ansible.builtin.file", {"path": str(tmp_path / "missing"), "state": "file"})
    assert rc == 2
    assert result["failed"] is True and "is absent" in result["msg"]


def test_run_playbook_passes_the_stack_vars(stack, tmp_path):
    playbook = tmp_path / "show.yml"
    playbook.write_text(yaml.safe_dump([{
        "hosts": "localhost", "gather_facts": False,
        "tasks": [{"ansible.builtin.debug": {"msg": "endpoint={{ cvmfs_publisher_rgw_endpoint }} x={{ x }}"}}]}]))
    proc = run_playbook(str(playbook), {"x": "given"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "endpoint=%s x=given" % stack["RGW_ENDPOINT"] in proc.stdout
