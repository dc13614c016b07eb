"""The operator's view: provision_repository.yml and remove_repository.yml run with ansible-playbook on the stack."""
import json
import re
import urllib.error
import urllib.request
import base64
from pathlib import Path

import boto3
import pytest

from helpers import aws_kwargs, run_module, run_playbook, seed_keys, ssl_context

RECAP = re.compile(r"^localhost\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def recap(proc):
    match = RECAP.search(proc.stdout)
    assert match, "no PLAY RECAP in output:\n" + proc.stdout[-3000:] + proc.stderr[-2000:]
    ok, changed, unreachable, failed = map(int, match.groups())
    return {"ok": ok, "changed": changed, "unreachable": unreachable, "failed": failed}


def vault_keys(stack, subject, fqrn):
    token = Path(stack["VAULT_TOKEN_FILE"]).read_text().strip()
    req = urllib.request.Request("%s/v1/%s/data/%s/cvmfs_keys/%s" % (stack["VAULT_ADDR"], stack["VAULT_KV_MOUNT"],
                                                                   subject, fqrn),
                                 headers={"X-Vault-Token": token})
    return json.load(urllib.request.urlopen(req, timeout=10, context=ssl_context(stack)))["data"]["data"]


def rabbit_queue(stack, name):
    password = Path(stack["AMQP_PASSWORD_FILE"]).read_text().strip()
    auth = base64.b64encode(("%s:%s" % (stack["AMQP_USER"], password)).encode()).decode()
    req = urllib.request.Request("%s/api/queues/%%2F/%s" % (stack["RABBITMQ_API_URL"], name),
                                 headers={"Authorization": "Basic " + auth})
    try:
        return json.load(urllib.request.urlopen(req, timeout=10, context=ssl_context(stack)))
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def clients(stack):
    kw = dict(endpoint_url=stack["RGW_ENDPOINT"], region_name=stack["RGW_REGION"],
              aws_access_key_id=Path(stack["RGW_ACCESS_KEY_FILE"]).read_text().strip(),
              aws_secret_access_key=Path(stack["RGW_SECRET_KEY_FILE"]).read_text().strip(),
              verify=stack.get("CA_CERT_FILE") or None)
    return boto3.client("s3", **kw), boto3.client("sns", **kw)


@pytest.fixture
def repository(stack, unique_name, s3):
    fqrn = "%s.infn.it" % unique_name
    subject = "sub-" + unique_name
    seed_keys(stack, fqrn, "--subject", subject)
    s3.create_bucket(Bucket=unique_name)
    return {"fqrn": fqrn, "short": unique_name, "subject": subject}


@pytest.mark.tls
def test_provision_twice_then_remove_leaves_nothing(stack, repository):
    fqrn, short = repository["fqrn"], repository["short"]
    extra = {"cvmfs_repository": fqrn, "cvmfs_subject": repository["subject"]}

    first = run_playbook("provision_repository.yml", extra)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    assert recap(first)["changed"] >= 5

    second = run_playbook("provision_repository.yml", extra)
    assert second.returncode == 0, second.stdout[-4000:]
    assert recap(second)["changed"] == 0, second.stdout[-4000:]

    check = run_playbook("provision_repository.yml", extra, check=True, diff=True)
    assert check.returncode == 0 and recap(check)["changed"] == 0, check.stdout[-4000:]

    root = Path(stack["CVMFS_STANDIN_ROOT"])
    keys = root / "etc/cvmfs/keys"
    assert {p.name for p in keys.glob(fqrn + ".*")} == {fqrn + ".crt", fqrn + ".pub", fqrn + ".gw"}
    assert (keys / (fqrn + ".gw")).stat().st_mode & 0o777 == 0o400
    assert (root / "etc/cvmfs/repositories.d" / fqrn / "server.conf").is_file()
    queue = rabbit_queue(stack, short)
    assert queue and queue["arguments"].get("x-queue-type") == "quorum"
    s3, sns = clients(stack)
    arns = [t["TopicArn"] for t in sns.list_topics()["Topics"] if t["TopicArn"].endswith(":" + short)]
    assert arns
    endpoint = json.loads(sns.get_topic_attributes(TopicArn=arns[0])["Attributes"]["EndPoint"])
    assert endpoint["EndpointAddress"] == stack["TOPIC_PUSH_ENDPOINT"]
    assert "verify-ssl=true" in endpoint["EndpointArgs"].split("&")
    if stack.get("CA_CERT_FILE"):  # RGW pushes over AMQPS and verifies the broker with the stack's CA
        assert endpoint["EndpointAddress"].startswith("amqps://")
        assert "ca-location=" + stack["CA_CERT_FILE"] in endpoint["EndpointArgs"].split("&")
    ids = [c["Id"] for c in s3.get_bucket_notification_configuration(Bucket=short).get("TopicConfigurations", [])]
    assert ids == ["cvmfs-publisher"]

    removed = run_playbook("remove_repository.yml", {"cvmfs_repository": fqrn})
    assert removed.returncode == 0, removed.stdout[-4000:] + removed.stderr[-2000:]
    assert not list(keys.glob(fqrn + ".*"))
    assert not (root / "etc/cvmfs/repositories.d" / fqrn).exists()
    assert rabbit_queue(stack, short) is None
    assert not [t for t in sns.list_topics()["Topics"] if t["TopicArn"].endswith(":" + short)]
    assert not s3.get_bucket_notification_configuration(Bucket=short).get("TopicConfigurations")

    again = run_playbook("remove_repository.yml", {"cvmfs_repository": fqrn})
    assert again.returncode == 0 and recap(again)["changed"] == 0, again.stdout[-4000:]


def test_provision_at_vvv_never_shows_key_material(stack, repository):
    fqrn = repository["fqrn"]
    secrets = vault_keys(stack, repository["subject"], fqrn)
    proc = run_playbook("provision_repository.yml",
                        {"cvmfs_repository": fqrn, "cvmfs_subject": repository["subject"]}, diff=True, verbosity=3)
    assert proc.returncode == 0, proc.stdout[-4000:]
    output = proc.stdout + proc.stderr
    assert "vault_repository_keys" in output  # the module really ran at this verbosity
    for field, value in secrets.items():
        for line in value.strip().splitlines():
            line = line.strip()
            if len(line) >= 16 and not line.startswith("-----"):
                assert line not in output, "key material from %s leaked into -vvv output" % field
    secret_id = Path(stack["VAULT_SECRET_ID_FILE"]).read_text().strip()
    assert secret_id not in output


def test_provision_rejects_invalid_repository_name(stack):
    proc = run_playbook("provision_repository.yml", {"cvmfs_repository": "-bad.infn.it", "cvmfs_subject": "x"})
    assert proc.returncode != 0
    assert "invalid repository name" in proc.stdout


def test_provision_without_keys_in_vault_fails_clearly(stack, unique_name):
    fqrn = "%s.infn.it" % unique_name
    proc = run_playbook("provision_repository.yml", {"cvmfs_repository": fqrn, "cvmfs_subject": "nobody"})
    assert proc.returncode != 0
    assert "no keys for %s" % fqrn in proc.stdout, proc.stdout[-3000:]


RECAPS = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def _seed_fleet(stack, s3, personal, group):
    seed_keys(stack, personal + ".infn.it", "--subject", "sub-" + personal)
    seed_keys(stack, group + ".infn.it", "--group", "grp-" + group)
    for short in (personal, group):
        s3.create_bucket(Bucket=short)
    return [{"repository": personal + ".infn.it", "subject": "sub-" + personal},
            {"repository": group + ".infn.it", "group": "grp-" + group}]


def test_converge_repositories_provisions_a_list_then_changes_nothing(stack, unique_name, s3):
    """playbooks/converge_repositories.yml: a personal and a group repository in one run, each step one module run
    for both (`batch`); the second run changes nothing, and neither does --check."""
    personal, group = unique_name + "p", unique_name + "g"
    fleet = {"cvmfs_repositories": _seed_fleet(stack, s3, personal, group)}

    first = run_playbook("converge_repositories.yml", fleet)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    hosts = {host: int(changed) for host, _ok, changed, _u, failed in RECAPS.findall(first.stdout)}
    assert hosts.keys() == {"localhost"} and hosts["localhost"] >= 5, first.stdout[-4000:]
    root = Path(stack["CVMFS_STANDIN_ROOT"])
    for short in (personal, group):
        assert (root / "etc/cvmfs/repositories.d" / (short + ".infn.it") / "server.conf").is_file()
        assert rabbit_queue(stack, short), "the queue of %s was not declared" % short
        notification = s3.get_bucket_notification_configuration(Bucket=short)
        assert [t["Id"] for t in notification.get("TopicConfigurations", [])] == ["cvmfs-publisher"], notification

    for check in (False, True):
        again = run_playbook("converge_repositories.yml", fleet, check=check, diff=check)
        assert again.returncode == 0, again.stdout[-4000:]
        recaps = RECAPS.findall(again.stdout)
        assert len(recaps) == 1 and all(changed == "0" and failed == "0" for _h, _o, changed, _u, failed in recaps), \
            again.stdout[-4000:]


def test_converge_repositories_refreshes_every_notification_when_the_topics_change(stack, unique_name, s3):
    """A changed topic setting (ack level) updates every topic, and each bucket's notification is dropped and made
    again so RGW applies it (the role's refresh step, batched); the run after that changes nothing."""
    personal, group = unique_name + "p", unique_name + "g"
    fleet = {"cvmfs_repositories": _seed_fleet(stack, s3, personal, group)}
    assert run_playbook("converge_repositories.yml", fleet).returncode == 0
    changed = dict(fleet, cvmfs_publisher_topic_ack_level="routable")
    proc = run_playbook("converge_repositories.yml", changed, diff=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
    tasks = dict(re.findall(r"TASK \[[^\]]*: ([^\]]+)\] \*+\n(?:(?!TASK \[).*\n)*?(changed|ok|skipping): ",
                            proc.stdout))
    assert "--- before: %s\n+++ after: %s\n" % (personal, personal) in proc.stdout, proc.stdout[-4000:]
    assert tasks["Create the RGW topics that push the buckets' events to those queues"] == "changed", tasks
    assert tasks["Drop the bucket notifications so that they pick up their changed topics"] == "changed", tasks
    assert tasks["Notify the topics of changes under the buckets' prefix"] == "changed", tasks
    sns = boto3.client("sns", **aws_kwargs(stack))
    for short in (personal, group):
        arn = "arn:aws:sns:%s::%s" % (stack["RGW_REGION"], short)
        assert "amqp-ack-level=routable" in json.dumps(sns.get_topic_attributes(TopicArn=arn)["Attributes"])
        notification = s3.get_bucket_notification_configuration(Bucket=short)
        assert [t["Id"] for t in notification.get("TopicConfigurations", [])] == ["cvmfs-publisher"], notification
    again = run_playbook("converge_repositories.yml", changed)
    assert again.returncode == 0 and RECAPS.findall(again.stdout)[0][2] == "0", again.stdout[-4000:]


def test_converge_repositories_goes_on_past_a_repository_that_fails(stack, unique_name, s3):
    """One repository without keys in Vault and one with a name no module accepts: the good one is provisioned all
    the way, the run fails naming both, each with its own reason."""
    good = unique_name + "ok"
    seed_keys(stack, good + ".infn.it", "--subject", "sub-" + good)
    s3.create_bucket(Bucket=good)
    fleet = {"cvmfs_repositories": [{"repository": unique_name + "nokeys.infn.it", "subject": "sub-nobody"},
                                    {"repository": good + ".infn.it", "subject": "sub-" + good},
                                    {"repository": "bad name!.infn.it", "group": "grp-x"}]}
    proc = run_playbook("converge_repositories.yml", fleet)
    assert proc.returncode != 0
    nokeys = unique_name + "nokeys.infn.it"
    assert "Install the keys from Vault: 2 of 3 failed: %s: no keys for %s" % (nokeys, nokeys) in proc.stdout, \
        proc.stdout[-4000:]
    assert "bad name!.infn.it: invalid repository name" in proc.stdout, proc.stdout[-4000:]
    root = Path(stack["CVMFS_STANDIN_ROOT"])
    assert (root / "etc/cvmfs/repositories.d" / (good + ".infn.it") / "server.conf").is_file()
    assert rabbit_queue(stack, good)
    notification = s3.get_bucket_notification_configuration(Bucket=good)
    assert [t["Id"] for t in notification.get("TopicConfigurations", [])] == ["cvmfs-publisher"], notification


def test_converge_repositories_reads_the_daemons_registry_by_default(stack, unique_name, s3, tmp_path):
    """Without a list: the repositories the daemon applied here (registry.json), that still exist here. A removed
    notification is put back; a repository applied but no longer on the host is not created again."""
    personal, group = unique_name + "p", unique_name + "g"
    fleet = _seed_fleet(stack, s3, personal, group)
    assert run_playbook("converge_repositories.yml", {"cvmfs_repositories": fleet}).returncode == 0
    rc, _ = run_module("infn_cloud.cvmfs_publisher.rgw_bucket_notification", dict(  # drift: a removed notification
        bucket=group, state="absent", endpoint_url="{{ cvmfs_publisher_rgw_endpoint }}",
        access_key_file="{{ cvmfs_publisher_rgw_access_key_file }}",
        secret_key_file="{{ cvmfs_publisher_rgw_secret_key_file }}"))
    assert rc == 0
    gone = {"repository": unique_name + "gone.infn.it", "subject": "sub-gone", "group": None}
    requests = [dict(entry, owner="someone", form="json") for entry in fleet + [gone]]
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"applied": dict((r["repository"], "0123456789abcdef") for r in requests),
                                    "requests": dict((r["repository"], r) for r in requests)}))
    proc = run_playbook("converge_repositories.yml", {"cvmfs_publisher_registry_file": str(registry)})
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert RECAPS.findall(proc.stdout)[0][2] == "1", proc.stdout[-4000:]  # the notification, nothing else
    notification = s3.get_bucket_notification_configuration(Bucket=group)
    assert [t["Id"] for t in notification.get("TopicConfigurations", [])] == ["cvmfs-publisher"], notification
    assert not (Path(stack["CVMFS_STANDIN_ROOT"]) / "etc/cvmfs/repositories.d" / gone["repository"]).exists()

    registry.write_text(json.dumps({"applied": {}, "requests": {}}))
    proc = run_playbook("converge_repositories.yml", {"cvmfs_publisher_registry_file": str(registry)})
    assert proc.returncode == 0 and "no repository to converge" in proc.stdout, proc.stdout[-4000:]


def test_converge_repositories_names_a_bad_list(stack):
    proc = run_playbook("converge_repositories.yml", {"cvmfs_repositories": [{"subject": "x"}]})
    assert proc.returncode != 0
    assert "repository request 1 has no repository name: {'subject': 'x'}" in proc.stdout, proc.stdout[-3000:]
