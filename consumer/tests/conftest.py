
import pytest
import yaml
from fakes import FakeBroker, FakeRunner, autospecced

from cvmfs_publisher_consumer.config import load
from cvmfs_publisher_consumer.daemon import Daemon


@pytest.fixture
def project(tmp_path):
    """A minimal project dir with the two playbooks, secret files and a valid config file."""
    root = tmp_path / "project"
    (root / "playbooks").mkdir(parents=True)
    for name in ("provision_repository.yml", "sync_repository.yml"):
        (root / "playbooks" / name).write_text("- hosts: localhost\n  gather_facts: false\n  tasks: []\n")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "amqp-password").write_text("s3cr3t-amqp-password\n")
    (secrets / "ca.pem").write_text("not really a CA\n")
    vars_file = tmp_path / "vars.yml"
    (secrets / "rgw-secret").write_text("rgw-secret-value-123\n")
    vars_file.write_text(yaml.safe_dump({"cvmfs_publisher_rgw_secret_key_file": str(secrets / "rgw-secret"),
                                         "cvmfs_publisher_rgw_endpoint": "http://127.0.0.1:1"}))
    config = {
        "amqp": {"host": "127.0.0.1", "port": 5672, "user": "publisher", "tls": False,
                 "password_file": str(secrets / "amqp-password")},
        "ansible": {"project_dir": str(root), "extravars_files": [str(vars_file)]},
        "state_dir": str(tmp_path / "state"),
        "repositories": {"config_dir": str(tmp_path / "repositories.d")},
        "metrics": {"port": 0},
    }
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    return {"root": root, "config_path": path, "config": config, "tmp": tmp_path, "secrets": secrets,
            "vars_file": vars_file}


@pytest.fixture
def daemon(project):
    repos = project["tmp"] / "repositories.d"
    (repos / "alice.infn.it").mkdir(parents=True)
    (repos / "bob.infn.it").mkdir()
    config = load(str(project["config_path"]), environ={})
    broker = autospecced(FakeBroker({"alice", "bob"}))
    runner = FakeRunner()
    clock = [1000.0]
    instance = Daemon(config, broker=broker, runner=runner, clock=lambda: clock[0])
    instance.clock_value = clock
    instance._connect()
    return instance
