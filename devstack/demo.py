#!/usr/bin/env python3
"""`make demo`: the whole story on the local stack.

1. start the stack (RabbitMQ, Ceph RGW, OpenBao, the cvmfs_server stand-in);
2. the Stratum-0 side stores a new repository's keys in Vault; the user has a bucket;
3. start the consumer daemon (`cvmfs-publisher run`);
4. the dashboard (its own broker user, allowed only to publish on the provisioning exchange) announces the
   repository, which lands on the `publisher` queue: the daemon provisions the repository (keys, repository, queue,
   topic, bucket notification); a second, manual `ansible-playbook` run shows nothing left to change;
5. the user uploads a nested tree and a tarball through S3, then deletes a file: RGW notifies RabbitMQ, the daemon
   syncs, and the published tree is printed after each step.

Everything started here is stopped at the end; DEMO_KEEP_STACK=1 leaves the stack running to look around
(`make demo-down` stops it then).
"""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "devstack"))
import standin  # noqa: E402  (reads the stand-in's published revisions)

STACK = str(ROOT / "devstack" / "stack")
SHORT = os.environ.get("DEMO_NAME", "alice")
FQRN = SHORT + ".infn.it"
SUBJECT = os.environ.get("DEMO_SUBJECT", "0a1b2c3d-demo-subject")
WAIT = 180


def step(title):
    print("\n\033[1m==> %s\033[0m" % title, flush=True)


def run(cmd, **kw):
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, text=True, **kw)


def stack_output(*args):
    return subprocess.run([STACK] + list(args), check=True, text=True, capture_output=True).stdout


def secret(path):
    return Path(path).read_text().strip()


class Demo:
    def __init__(self):
        self.stack = json.loads(stack_output("env", "--json"))
        self.vars_file = stack_output("vars").strip()
        self.cvmfs_root = Path(self.stack["CVMFS_STANDIN_ROOT"])
        self.daemon = None
        self.daemon_dir = Path(self.stack["DEVSTACK_DIR"]) / "demo-daemon"
        import boto3
        from botocore.config import Config
        kw = dict(endpoint_url=self.stack["RGW_ENDPOINT"], region_name=self.stack["RGW_REGION"],
                  aws_access_key_id=secret(self.stack["RGW_ACCESS_KEY_FILE"]),
                  aws_secret_access_key=secret(self.stack["RGW_SECRET_KEY_FILE"]),
                  config=Config(request_checksum_calculation="when_required",
                                response_checksum_validation="when_required"))
        self.s3 = boto3.client("s3", **kw)
        self.sns = boto3.client("sns", **kw)

    # -- the daemon --------------------------------------------------------------------------------------
    def start_daemon(self):
        import yaml
        self.daemon_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "amqp": {"host": self.stack["AMQP_HOST"], "port": int(self.stack["AMQP_PORT"]),
                     "user": self.stack["AMQP_USER"], "password_file": self.stack["AMQP_PASSWORD_FILE"],
                     "vhost": self.stack["AMQP_VHOST"], "tls": False},
            "repositories": {"config_dir": str(self.cvmfs_root / "etc/cvmfs/repositories.d"), "rescan_interval": 5},
            "ansible": {"project_dir": str(ROOT), "extravars_files": [self.vars_file],
                        "env": {"ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")}},
            "state_dir": str(self.daemon_dir / "state"),
            "metrics": {"port": int(os.environ.get("DEVSTACK_PORT_BASE", "18000")) + 40},
        }
        config_path = self.daemon_dir / "config.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log_path = self.daemon_dir / "daemon.log"
        cli = ROOT / ".venv" / "bin" / "cvmfs-publisher"
        env = dict(os.environ, PATH="%s:%s" % (cli.parent, os.environ.get("PATH", "")))
        print("$ cvmfs-publisher -c %s run   (log: %s)" % (config_path, self.log_path), flush=True)
        with open(self.log_path, "a") as log:
            self.daemon = subprocess.Popen([str(cli), "-c", str(config_path), "run"], stdout=log,
                                           stderr=subprocess.STDOUT, env=env)
        self.wait_for_event(lambda e: e.get("event") == "connected", "the daemon to connect")
        print("daemon pid %d, metrics on http://127.0.0.1:%d/metrics" % (self.daemon.pid, config["metrics"]["port"]))

    def events(self):
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def runs_in_flight(self):
        events = [e.get("event") for e in self.events()]
        ended = sum(events.count(end) for end in ("run_succeeded", "run_failed", "run_interrupted"))
        return events.count("run_started") - ended

    def wait_for_event(self, predicate, what):
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if any(predicate(e) for e in self.events()):
                return
            if self.daemon.poll() is not None:
                sys.exit("demo: the daemon exited (%s) while waiting for %s:\n%s" % (
                    self.daemon.returncode, what, self.log_path.read_text()[-3000:]))
            time.sleep(0.3)
        sys.exit("demo: gave up waiting for %s; daemon log tail:\n%s" % (what, self.log_path.read_text()[-3000:]))

    def stop_daemon(self):
        if self.daemon and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            self.daemon.wait(timeout=120)
            print("daemon stopped (exit %s)" % self.daemon.returncode)

    # -- what the outside world does ---------------------------------------------------------------------
    def announce_repository(self):
        import pika
        params = pika.ConnectionParameters(
            host=self.stack["AMQP_HOST"], port=int(self.stack["AMQP_PORT"]),
            credentials=pika.PlainCredentials(self.stack["AMQP_DASHBOARD_USER"],
                                              secret(self.stack["AMQP_DASHBOARD_PASSWORD_FILE"])))
        body = json.dumps({"version": 1, "repository": FQRN, "owner": SHORT, "subject": SUBJECT, "kind": "personal"})
        connection = pika.BlockingConnection(params)
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_publish(self.stack["AMQP_PROVISIONING_EXCHANGE"], "publisher", body.encode(),
                                  pika.BasicProperties(delivery_mode=2), mandatory=True)
        finally:
            connection.close()
        print("published as %s on exchange %s, routing key 'publisher': %s"
              % (self.stack["AMQP_DASHBOARD_USER"], self.stack["AMQP_PROVISIONING_EXCHANGE"], body))

    def published(self):
        return standin.published_tree(str(self.cvmfs_root), FQRN)

    def wait_published(self, expected_present, expected_absent=()):
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            tree = self.published()
            if all(p in tree for p in expected_present) and not any(p in tree for p in expected_absent):
                return tree
            time.sleep(0.3)
        sys.exit("demo: the repository never reached the expected tree; daemon log tail:\n%s"
                 % self.log_path.read_text()[-3000:])

    def show_tree(self, tree):
        print("/cvmfs/%s  (revision %d)" % (FQRN, standin.current_revision(str(self.cvmfs_root), FQRN)))
        for path in sorted(tree):
            kind = tree[path]
            print("  %s%s" % (path, "/" if kind == "dir" else ""))

    def show_provisioned(self):
        for suffix in ("crt", "pub", "gw"):
            key = self.cvmfs_root / "etc/cvmfs/keys" / ("%s.%s" % (FQRN, suffix))
            print("key          %s  mode %o" % (key, key.stat().st_mode & 0o777))
        listing = subprocess.run([self.stack["CVMFS_SERVER_BIN"], "list"], text=True, capture_output=True).stdout
        print("repository   " + [line for line in listing.splitlines() if line.startswith(FQRN)][0])
        conf = self.cvmfs_root / "etc/cvmfs/repositories.d" / FQRN / "server.conf"
        for line in conf.read_text().splitlines():
            if line.startswith(("CVMFS_STRATUM0=", "CVMFS_UPSTREAM_STORAGE=")):
                print("             " + line)
        import base64
        import urllib.request
        auth = base64.b64encode(("%s:%s" % (self.stack["AMQP_USER"], secret(self.stack["AMQP_PASSWORD_FILE"])))
                                .encode()).decode()
        request = urllib.request.Request("%s/api/queues/%%2F/%s" % (self.stack["RABBITMQ_API_URL"], SHORT),
                                         headers={"Authorization": "Basic " + auth})
        queue = json.load(urllib.request.urlopen(request, timeout=10))
        print("queue        %s  type=%s consumers=%s arguments=%s" % (
            queue["name"], queue.get("type"), queue.get("consumers"), json.dumps(queue["arguments"])))
        for topic in self.sns.list_topics().get("Topics", []):
            if topic["TopicArn"].endswith(":" + SHORT):
                endpoint = self.sns.get_topic_attributes(TopicArn=topic["TopicArn"])["Attributes"].get("EndPoint", "")
                print("topic        %s  %s" % (topic["TopicArn"], endpoint))
                break
        for conf in self.s3.get_bucket_notification_configuration(Bucket=SHORT).get("TopicConfigurations", []):
            rules = conf.get("Filter", {}).get("Key", {}).get("FilterRules", [])
            print("notification %s on bucket %s -> %s %s %s" % (
                conf["Id"], SHORT, conf["TopicArn"], conf["Events"], rules))


def tarball(members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name.endswith(".sh") else 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def main():
    step("Start the local stack (RabbitMQ, Ceph RGW, OpenBao, cvmfs_server stand-in)")
    started = time.monotonic()
    run([STACK, "up"])
    print("(%.1f s)" % (time.monotonic() - started))
    demo = Demo()
    try:
        step("Stratum-0 side: create %s's keys and store them in Vault; the user has a bucket" % FQRN)
        run([STACK, "seed-keys", FQRN, "--subject", SUBJECT])
        if SHORT not in [b["Name"] for b in demo.s3.list_buckets().get("Buckets", [])]:
            demo.s3.create_bucket(Bucket=SHORT)
        print("bucket %s" % SHORT)

        step("Start the consumer daemon")
        demo.start_daemon()

        step("The dashboard announces the repository; the daemon provisions it")
        started = time.monotonic()
        demo.announce_repository()
        demo.wait_for_event(lambda e: e.get("event") == "consuming" and e.get("queue") == SHORT,
                            "the daemon to provision %s and consume its queue" % FQRN)
        print("provisioned and consuming queue %s after %.1f s" % (SHORT, time.monotonic() - started))
        demo.show_provisioned()

        step("An operator re-runs the provisioning playbook by hand: nothing to change")
        env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
                   PATH="%s:%s" % (ROOT / ".venv" / "bin", os.environ.get("PATH", "")))
        proc = subprocess.run(["ansible-playbook", str(ROOT / "playbooks" / "provision_repository.yml"),
                               "-e", "@" + demo.vars_file,
                               "-e", json.dumps({"cvmfs_repository": FQRN, "cvmfs_subject": SUBJECT})],
                              env=env, text=True, capture_output=True)
        print(proc.stdout[proc.stdout.find("PLAY RECAP"):].strip() or proc.stdout[-3000:])
        if proc.returncode:
            sys.exit("demo: provisioning by hand failed:\n" + proc.stdout[-3000:])

        step("The user uploads a nested tree and a tarball to s3://%s/cvmfs/" % SHORT)
        uploads = {
            "cvmfs/README": b"Software for alice's analysis\n",
            "cvmfs/sw/v1.0/bin/analyse": b"#!/bin/sh\necho analysing\n",
            "cvmfs/sw/v1.0/lib/libphysics.so": os.urandom(4096),
            "cvmfs/sw/v1.0/share/data/calibration.json": b'{"gain": 1.02}\n',
        }
        started = time.monotonic()
        for key, body in uploads.items():
            demo.s3.put_object(Bucket=SHORT, Key=key, Body=body)
            print("PUT s3://%s/%s" % (SHORT, key))
        demo.s3.put_object(Bucket=SHORT, Key="cvmfs/tools.tar.gz",
                           Body=tarball({"bin/tool.sh": b"#!/bin/sh\necho tool\n", "etc/tool.conf": b"x=1\n"}))
        print("PUT s3://%s/cvmfs/tools.tar.gz  (bin/tool.sh, etc/tool.conf: ingested into tools/)" % SHORT)
        tree = demo.wait_published(["README", "sw/v1.0/bin/analyse", "sw/v1.0/share/data/calibration.json",
                                    "tools/bin/tool.sh", "tools/etc/tool.conf"])
        print("published %.1f s after the first upload" % (time.monotonic() - started))
        demo.show_tree(tree)

        step("The user deletes a file and the tarball")
        started = time.monotonic()
        for key in ("cvmfs/sw/v1.0/lib/libphysics.so", "cvmfs/tools.tar.gz"):
            demo.s3.delete_object(Bucket=SHORT, Key=key)
            print("DELETE s3://%s/%s" % (SHORT, key))
        tree = demo.wait_published(["README"], ["sw/v1.0/lib/libphysics.so", "sw/v1.0/lib", "tools"])
        print("published %.1f s after the deletions" % (time.monotonic() - started))
        demo.show_tree(tree)

        step("The daemon's runs")
        # The tree is published a moment before the run that published it reports back.
        demo.wait_for_event(lambda _e: demo.runs_in_flight() == 0, "the last run to finish")
        runs = [e for e in demo.events() if e.get("event") == "run_succeeded"]
        for event in runs:
            print("  %-9s %-16s %s" % (event.get("mode"), event.get("repository"),
                                       ", ".join("%s=%s" % (k, event[k]) for k in ("duration", "keys", "batch_size")
                                                 if k in event)))
        subprocess.run([str(ROOT / ".venv" / "bin" / "cvmfs-publisher"), "-c",
                        str(demo.daemon_dir / "config.yml"), "status"])
    finally:
        step("Stop")
        demo.stop_daemon()
        if os.environ.get("DEMO_KEEP_STACK") == "1":
            print("The stack is still running: `source <(devstack/stack env)`, `make demo-down` to stop it.")
        else:
            run([STACK, "down"])


if __name__ == "__main__":
    main()
