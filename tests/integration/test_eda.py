"""Event-Driven Ansible end to end: the real ``ansible-rulebook`` (PyPI, in .venv-eda, Java 17 rule engine) runs the
collection's rulebook ``infn_cloud.cvmfs_publisher.publish_repositories`` with its event source
``repository_queues`` against the local stack: a provisioning message becomes a repository, an upload becomes
published, a malformed message is dead-lettered, and an event lost while nobody listened is repaired by the
source's periodic full reconcile (the guarantee that makes acking at hand-over safe).

Each test has its own provisioning queue, dead-letter queue and repository names.
"""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from helpers import consumer_e2e, stack_vars_file

REPO_ROOT = Path(__file__).resolve().parents[2]
RULEBOOK_BIN = REPO_ROOT / ".venv-eda" / "bin" / "ansible-rulebook"
RULEBOOK = "infn_cloud.cvmfs_publisher.publish_repositories"
START_TIMEOUT = 300

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not RULEBOOK_BIN.exists(), reason="needs .venv-eda: make eda-venv")]


e2e = consumer_e2e()


class Rulebook:
    """One ``ansible-rulebook`` process with its own inventory (the stack's vars as group_vars) and source settings."""

    def __init__(self, stack, folder, names, include, **settings):
        self.folder = folder
        self.log_path = folder / "rulebook.log"
        inventory = folder / "inventory"
        (inventory / "group_vars").mkdir(parents=True)
        (inventory / "group_vars" / "all.yml").write_text(Path(stack_vars_file()).read_text())
        (inventory / "hosts.yml").write_text(yaml.safe_dump({"all": {"hosts": {"localhost": {
            "ansible_connection": "local", "ansible_python_interpreter": str(REPO_ROOT / ".venv/bin/python")}}}}))
        source = {"host": stack["AMQP_HOST"], "port": int(stack["AMQP_PORT"]), "user": stack["AMQP_USER"],
                  "password_file": stack["AMQP_PASSWORD_FILE"], "vhost": stack["AMQP_VHOST"], "tls": False,
                  "publisher_queue": names["publisher"], "dead_letter_queue": names["dlq"],
                  "config_dir": str(Path(stack["CVMFS_STANDIN_ROOT"]) / "etc/cvmfs/repositories.d"),
                  "include": include, "rescan_interval": 1, "batch_window": 0.3, "full_reconcile_interval": 0}
        source.update(settings)
        (folder / "eda.yml").write_text(yaml.safe_dump({"cvmfs_publisher_eda": source}))
        self.process = None

    def start(self):
        env = dict(os.environ, PATH="%s:%s" % (REPO_ROOT / ".venv" / "bin", os.environ.get("PATH", "")),
                   ANSIBLE_CONFIG=str(REPO_ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1", PYTHONUNBUFFERED="1")
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(
                [str(RULEBOOK_BIN), "-r", RULEBOOK, "-i", str(self.folder / "inventory"),
                 "--vars", str(self.folder / "eda.yml"), "-v"],
                cwd=str(self.folder), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.wait_for("connected; consuming", "the event source never connected", START_TIMEOUT)
        return self

    def log(self):
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text, what, timeout=e2e.CONVERGE_TIMEOUT, count=1):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(text) >= count:
                return
            if self.process.poll() is not None:
                pytest.fail("%s: ansible-rulebook exited with %s:\n%s" % (what, self.process.returncode,
                                                                          self.log()[-4000:]))
            time.sleep(0.3)
        pytest.fail("%s (after %ss):\n%s" % (what, timeout, self.log()[-4000:]))

    def stop(self):
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)


@pytest.fixture
def rulebooks(stack, tmp_path, unique_name):
    started = []
    names = {"publisher": "publisher-" + unique_name, "dlq": unique_name + ".dlq"}

    def make(name="rulebook", **settings):
        folder = tmp_path / name
        folder.mkdir()
        rulebook = Rulebook(stack, folder, names, ["%s*.infn.it" % unique_name], **settings)
        started.append(rulebook)
        return rulebook

    make.queues = names
    yield make
    secrets = e2e.stack_secrets(stack)
    for rulebook in started:
        rulebook.stop()
        text = rulebook.log()
        for secret in secrets:
            assert secret not in text, "a secret appears in the rulebook's log"


def provision(stack, s3, rulebook, queues, short):
    fqrn = short + ".infn.it"
    e2e.seed_keys(stack, fqrn, "sub-" + short)
    s3.create_bucket(Bucket=short)
    e2e.publish(stack, queues["publisher"], "%s,sub-%s,%s,P" % (short, short, fqrn))
    rulebook.wait_for("consuming %s (%s)" % (short, fqrn), "the new repository's queue was never consumed")
    # The queue exists before the playbook has made the RGW topic and notification: wait for the notification.
    deadline = time.monotonic() + e2e.CONVERGE_TIMEOUT
    while not s3.get_bucket_notification_configuration(Bucket=short).get("TopicConfigurations"):
        if time.monotonic() > deadline:
            pytest.fail("the bucket notification of %s never appeared:\n%s" % (short, rulebook.log()[-4000:]))
        time.sleep(0.5)
    return fqrn


def test_an_upload_is_published_through_the_rulebook(stack, s3, rulebooks, unique_name):
    rulebook = rulebooks().start()
    fqrn = provision(stack, s3, rulebook, rulebooks.queues, unique_name)
    assert (Path(stack["CVMFS_STANDIN_ROOT"]) / "etc/cvmfs/repositories.d" / fqrn).is_dir()

    s3.put_object(Bucket=unique_name, Key="cvmfs/hello/world.txt", Body=b"hello from EDA\n")
    s3.put_object(Bucket=unique_name, Key="cvmfs/with space/a+b.txt", Body=b"odd name\n")
    published = e2e.wait_published(stack, s3, fqrn, unique_name)
    assert set(published) == {"hello/world.txt", "with space/a+b.txt"}
    s3.delete_object(Bucket=unique_name, Key="cvmfs/hello/world.txt")
    assert set(e2e.wait_published(stack, s3, fqrn, unique_name)) == {"with space/a+b.txt"}

    e2e.publish(stack, unique_name, '{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": '
                '{"name": "%s"}, "object": {"key": "cvmfs/../../etc/passwd"}}}]}' % unique_name)
    e2e.publish(stack, unique_name, b"\x00not json")
    e2e.publish(stack, rulebooks.queues["publisher"], "not,a,request")
    deadline = time.monotonic() + 120
    dead = []
    while len(dead) < 2 and time.monotonic() < deadline:
        dead += e2e.drain_queue(stack, rulebooks.queues["dlq"])
        time.sleep(0.5)
    reasons = sorted(headers["x-cvmfs-publisher-reason"] for _body, headers in dead)
    assert len(reasons) == 2, reasons
    assert "event is not valid JSON" in reasons[0] and "4 comma-separated fields" in reasons[1], reasons
    assert {headers["x-cvmfs-publisher-queue"] for _b, headers in dead} == {unique_name,
                                                                            rulebooks.queues["publisher"]}
    assert "object refused: cvmfs/../../etc/passwd: " in rulebook.log()   # one hostile key: refused, not a dead letter


def lose_the_event(stack, queue):
    """Wait for RGW's notification to reach the queue, then purge it: the event is lost for good."""
    connection = e2e.amqp_connection(stack)
    try:
        channel = connection.channel()
        deadline = time.monotonic() + 120
        while not channel.queue_declare(queue, passive=True).method.message_count:
            assert time.monotonic() < deadline, "RGW's notification never reached queue %s" % queue
            time.sleep(0.5)
        assert channel.queue_purge(queue).method.message_count == 1
    finally:
        connection.close()


def test_an_event_lost_while_nobody_listened_is_published_by_the_periodic_full_reconcile(stack, s3, rulebooks,
                                                                                          unique_name):
    rulebook = rulebooks().start()
    fqrn = provision(stack, s3, rulebook, rulebooks.queues, unique_name)
    rulebook.stop()
    s3.put_object(Bucket=unique_name, Key="cvmfs/lost.txt", Body=b"its event was lost\n")
    lose_the_event(stack, unique_name)
    assert e2e.published_files(stack, fqrn) == {}
    rulebooks("again", full_reconcile_interval=3).start()
    assert set(e2e.wait_published(stack, s3, fqrn, unique_name)) == {"lost.txt"}
