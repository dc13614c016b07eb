import pytest

from cvmfs_publisher_consumer import cli
from cvmfs_publisher_consumer.config import ConfigError, env_overrides, load

import yaml


def write_config(project, **changes):
    config = project["config"]
    for dotted, value in changes.items():
        node = config
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    project["config_path"].write_text(yaml.safe_dump(config))
    return project["config_path"]


def test_defaults_and_values(project):
    config = load(str(project["config_path"]), environ={})
    assert config["amqp.host"] == "127.0.0.1"
    assert config["queues.sync_prefetch"] == 1000
    assert config["sync.full_reconcile_interval"] == 21600.0  # on by default: no lost event waits on a person
    assert config["queues.dead_letter"] == "cvmfs-publisher.dlq"
    assert config.section("amqp")["port"] == 5672


def test_environment_overrides_win(project):
    config = load(str(project["config_path"]), environ={
        "CVMFS_PUBLISHER__AMQP__PORT": "5999", "CVMFS_PUBLISHER__SYNC__MAX_PARALLEL": "8",
        "CVMFS_PUBLISHER__ANSIBLE__ENV": "{ANSIBLE_FORKS: 3}", "OTHER": "x"})
    assert (config["amqp.port"], config["sync.max_parallel"]) == (5999, 8)
    assert config["ansible.env"] == {"ANSIBLE_FORKS": "3"}


def test_config_path_from_environment(project):
    assert load(environ={"CVMFS_PUBLISHER_CONFIG": str(project["config_path"])}).path == str(project["config_path"])


@pytest.mark.parametrize("changes, message", [
    ({"amqp.hots": "x"}, "amqp.hots: unknown key"),
    ({"amqp.port": "many"}, "amqp.port: expected int, got 'many'"),
    ({"amqp.port": 70000}, "amqp.port: must be a TCP port"),
    ({"amqp.tls": True}, "amqp.ca_cert: required when amqp.tls is true"),
    ({"amqp.password_file": "/nonexistent/pw"},
     "amqp.password_file: password file '/nonexistent/pw' is not a readable"),
    ({"amqp.client_cert": "/x"}, "amqp.client_cert and amqp.client_key: set both or neither"),
    ({"sync.max_parallel": 0}, "sync.max_parallel: must be greater than 0"),
    ({"sync.retry_max_delay": 1.0}, "sync.retry_max_delay: must be at least sync.retry_initial_delay"),
    ({"ansible.project_dir": "/nonexistent"}, "ansible.project_dir: '/nonexistent' is not a directory"),
    ({"ansible.sync_playbook": "nope.yml"}, "ansible.sync_playbook: playbook"),
    ({"ansible.extravars_files": ["/nonexistent.yml"]}, r"ansible.extravars_files\[0\]"),
    ({"ansible.env": {"A": [1]}}, "ansible.env.A: expected a string"),
    ({"log.level": "LOUD"}, "log.level: must be DEBUG"),
    ({"repositories.prefix": "cvmfs"}, "repositories.prefix: must end with '/'"),
    ({"queues.dead_letter": "publisher"}, "queues.dead_letter: must differ"),
    ({"queues.registry": "publisher"}, "queues.registry: must differ"),
    ({"amqp.fallback_hosts": ["rabbit2"]}, r"amqp.fallback_hosts\[0\]: expected host:port, got 'rabbit2'"),
    ({"cluster.management_urls": ["rabbit1:15671"]}, r"cluster.management_urls\[0\]: expected an http\(s\) URL"),
    ({"cluster.host_id": "pub 1"}, "cluster.host_id: up to 128 letters"),
])
def test_errors_name_the_key(project, changes, message):
    path = write_config(project, **changes)
    with pytest.raises(ConfigError, match=message):
        load(str(path), environ={})


def test_missing_required_key(project):
    del project["config"]["amqp"]["user"]
    path = write_config(project)
    with pytest.raises(ConfigError, match="amqp.user: required"):
        load(str(path), environ={})


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read configuration file"):
        load(str(tmp_path / "none.yml"), environ={})
    (tmp_path / "bad.yml").write_text("amqp: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(str(tmp_path / "bad.yml"), environ={})


def test_env_override_parsing():
    assert env_overrides({"CVMFS_PUBLISHER__AMQP__TLS": "false", "CVMFS_PUBLISHER__AMQP__HOST": ""}) == {
        "amqp.tls": False, "amqp.host": ""}


def test_check_config_command(project, capsys):
    assert cli.main(["-c", str(project["config_path"]), "check-config"]) == 0
    out = capsys.readouterr().out
    assert "is valid" in out and "amqp.password_file" in out
    assert "s3cr3t" not in out  # the configuration holds paths, never secrets


def test_bad_configuration_exits_non_zero(project, capsys):
    path = write_config(project, **{"amqp.port": "x"})
    assert cli.main(["-c", str(path), "run"]) == cli.EXIT_CONFIG
    assert "invalid configuration: amqp.port: expected int" in capsys.readouterr().err


def test_the_example_configuration_is_valid():
    import os

    from cvmfs_publisher_consumer.config import validate
    example = os.path.join(os.path.dirname(__file__), "..", "config.example.yml")
    with open(example) as handle:
        values = validate(yaml.safe_load(handle), check_files=False)
    assert values["queues.sync_prefetch"] == 1000 and values["repositories.include"] == ["*.infn.it"]
