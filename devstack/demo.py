#!/usr/bin/env python3
"""`make demo`: the main job end to end on the local stack.

Starts the stack, seeds a repository's keys in Vault as the Stratum-0 side would, provisions the repository with
playbooks/provision_repository.yml (twice, to show the second run changes nothing), and prints what was created.
The stack keeps running afterwards so you can look around; `make demo-down` stops it.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STACK = str(ROOT / "devstack" / "stack")
FQRN = os.environ.get("DEMO_REPOSITORY", "alice.infn.it")
SUBJECT = os.environ.get("DEMO_SUBJECT", "0a1b2c3d-demo-subject")


def step(title):
    print("\n\033[1m==> %s\033[0m" % title, flush=True)


def run(cmd, **kw):
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, text=True, **kw)


def ansible_env():
    env = dict(os.environ)
    env["ANSIBLE_CONFIG"] = str(ROOT / "ansible.cfg")
    env["PATH"] = "%s:%s" % (ROOT / ".venv" / "bin", env.get("PATH", ""))
    return env


def playbook(name, extra, env):
    started = time.monotonic()
    proc = subprocess.run(
        ["ansible-playbook", str(ROOT / "playbooks" / name), "-e", "@" + vars_file, "-e", json.dumps(extra)],
        env=env, text=True, capture_output=True)
    elapsed = time.monotonic() - started
    recap = proc.stdout[proc.stdout.find("PLAY RECAP"):].strip()
    print(recap or proc.stdout[-3000:])
    if proc.returncode:
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
        sys.exit("demo: %s failed (rc=%d)" % (name, proc.returncode))
    print("(%.1f s)" % elapsed)
    return elapsed


def main():
    global vars_file
    step("Start the local stack (RabbitMQ, Ceph RGW, OpenBao, cvmfs_server stand-in)")
    started = time.monotonic()
    run([STACK, "up"])
    print("(%.1f s)" % (time.monotonic() - started))
    stack = json.loads(subprocess.run([STACK, "env", "--json"], check=True, text=True, capture_output=True).stdout)
    vars_file = subprocess.run([STACK, "vars"], check=True, text=True, capture_output=True).stdout.strip()
    env = ansible_env()

    step("Stratum-0 side: create %s's keys and store them in Vault" % FQRN)
    run([STACK, "seed-keys", FQRN, "--subject", SUBJECT])

    step("The user's bucket exists (the user creates it in their S3 account)")
    import boto3
    from botocore.config import Config
    s3 = boto3.client(
        "s3", endpoint_url=stack["RGW_ENDPOINT"], region_name=stack["RGW_REGION"],
        aws_access_key_id=Path(stack["RGW_ACCESS_KEY_FILE"]).read_text().strip(),
        aws_secret_access_key=Path(stack["RGW_SECRET_KEY_FILE"]).read_text().strip(),
        config=Config(request_checksum_calculation="when_required", response_checksum_validation="when_required"))
    bucket = FQRN.split(".")[0]
    if bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket=bucket)
    print("bucket %s" % bucket)

    extra = {"cvmfs_repository": FQRN, "cvmfs_subject": SUBJECT}
    step("Provision %s (first run)" % FQRN)
    playbook("provision_repository.yml", extra, env)
    step("Provision %s again: nothing to change" % FQRN)
    playbook("provision_repository.yml", extra, env)

    step("What was created")
    root = Path(stack["CVMFS_STANDIN_ROOT"])
    for suffix in ("crt", "pub", "gw"):
        key = root / "etc/cvmfs/keys" / ("%s.%s" % (FQRN, suffix))
        print("key        %s  mode %o" % (key, key.stat().st_mode & 0o777))
    print("repository " + subprocess.run([stack["CVMFS_SERVER_BIN"], "list"], text=True,
                                         capture_output=True).stdout.strip().replace("\n", "\n           "))
    conf = root / "etc/cvmfs/repositories.d" / FQRN / "server.conf"
    for line in conf.read_text().splitlines():
        if line.startswith(("CVMFS_STRATUM0=", "CVMFS_UPSTREAM_STORAGE=")):
            print("           " + line)
    import base64
    import urllib.request
    auth = base64.b64encode(("%s:%s" % (stack["AMQP_USER"], Path(stack["AMQP_PASSWORD_FILE"]).read_text().strip())).encode()).decode()
    req = urllib.request.Request("%s/api/queues/%%2F/%s" % (stack["RABBITMQ_API_URL"], bucket),
                                 headers={"Authorization": "Basic " + auth})
    queue = json.load(urllib.request.urlopen(req, timeout=10))
    print("queue      %s  type=%s arguments=%s" % (queue["name"], queue.get("type"), json.dumps(queue["arguments"])))
    sns = boto3.client(
        "sns", endpoint_url=stack["RGW_ENDPOINT"], region_name=stack["RGW_REGION"],
        aws_access_key_id=Path(stack["RGW_ACCESS_KEY_FILE"]).read_text().strip(),
        aws_secret_access_key=Path(stack["RGW_SECRET_KEY_FILE"]).read_text().strip())
    for topic in sns.list_topics().get("Topics", []):
        if topic["TopicArn"].endswith(":" + bucket):
            attrs = sns.get_topic_attributes(TopicArn=topic["TopicArn"])["Attributes"]
            print("topic      %s  endpoint=%s" % (topic["TopicArn"], attrs.get("EndPoint", "")))
            break
    notif = s3.get_bucket_notification_configuration(Bucket=bucket)
    for conf in notif.get("TopicConfigurations", []):
        rules = conf.get("Filter", {}).get("Key", {}).get("FilterRules", [])
        print("notification %s on bucket %s -> %s events=%s filter=%s" % (
            conf["Id"], bucket, conf["TopicArn"], conf["Events"], rules))

    print("\nThe stack is still running: `source <(devstack/stack env)` to use it, `make demo-down` to stop it.")


if __name__ == "__main__":
    main()
