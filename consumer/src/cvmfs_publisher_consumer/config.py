"""The daemon's configuration: one YAML file, environment overrides, validation that names the bad key.

Pure: reads files but talks to no service. Secrets are never configuration values, only paths to files
(keys ending in ``_file``), so the configuration itself can be logged and shown by ``check-config``.

Environment overrides (for containers): ``CVMFS_PUBLISHER__<SECTION>__<KEY>=value`` sets ``section.key``;
the value is parsed as a YAML scalar (``5672`` is a number, ``false`` a boolean, ``[a, b]`` a list).
"""
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import yaml

ENV_PREFIX = "CVMFS_PUBLISHER__"
CONFIG_PATH_ENV = "CVMFS_PUBLISHER_CONFIG"
DEFAULT_CONFIG_PATH = "/etc/cvmfs-publisher/config.yml"


class ConfigError(ValueError):
    """A configuration problem; the message names the key and says what is expected."""


REQUIRED = object()


@dataclass(frozen=True)
class Field:
    kind: type
    default: Any = REQUIRED
    check: Optional[Callable[[Any], Optional[str]]] = None  # returns an error text or None
    doc: str = ""


def _positive(value):
    return None if value > 0 else "must be greater than 0"


def _not_negative(value):
    return None if value >= 0 else "must be 0 or more"


def _port(value):
    return None if 0 <= value <= 65535 else "must be a TCP port (0-65535)"


def _log_level(value):
    return None if value.upper() in ("DEBUG", "INFO", "WARNING", "ERROR") else "must be DEBUG, INFO, WARNING or ERROR"


def _queue_name(value):
    return None if value and len(value) <= 255 else "must be a queue name of 1-255 characters"


# The one list of keys: defaults, types and checks. README.md documents the same keys.
FIELDS: Dict[str, Field] = {
    "amqp.host": Field(str, doc="RabbitMQ host name (also the TLS server name unless amqp.server_hostname)"),
    "amqp.port": Field(int, 5671, _port),
    "amqp.vhost": Field(str, "/"),
    "amqp.user": Field(str),
    "amqp.password_file": Field(str, doc="file holding the RabbitMQ password"),
    "amqp.tls": Field(bool, True),
    "amqp.ca_cert": Field(str, "", doc="CA bundle that signs the broker's certificate (required with tls)"),
    "amqp.client_cert": Field(str, ""),
    "amqp.client_key": Field(str, ""),
    "amqp.server_hostname": Field(str, ""),
    "amqp.heartbeat": Field(int, 60, _positive),
    "amqp.connection_timeout": Field(float, 10.0, _positive),
    "amqp.reconnect_initial_delay": Field(float, 1.0, _positive),
    "amqp.reconnect_max_delay": Field(float, 60.0, _positive),
    "amqp.fallback_hosts": Field(list, [], doc="other nodes of the RabbitMQ cluster as host:port, tried in turn"),
    "queues.publisher": Field(str, "publisher", _queue_name),
    "queues.provisioning_exchange": Field(str, "cvmfs-publisher.provisioning",
                                          doc="direct exchange the dashboard publishes provisioning requests on, "
                                          "routing key = queues.publisher (declared and bound by the daemon; "
                                          "empty: none, requests only through the default exchange)"),
    "queues.dead_letter": Field(str, "cvmfs-publisher.dlq", _queue_name),
    "queues.registry": Field(str, "cvmfs-publisher.registry", _queue_name,
                             doc="stream of every accepted provisioning request, replayed by every host"),
    "queues.publisher_prefetch": Field(int, 10, _positive),
    "queues.sync_prefetch": Field(int, 1000, _positive),
    "provisioning.reapply_interval": Field(float, 3600.0, _not_negative, doc="seconds between two runs of every "
                                           "provisioning applied here, which repair what changed since; 0: never"),
    "repositories.config_dir": Field(str, "/etc/cvmfs/repositories.d"),
    "repositories.include": Field(list, ["*"], doc="shell patterns of the fqrns this daemon consumes"),
    "repositories.rescan_interval": Field(float, 60.0, _not_negative),
    "repositories.prefix": Field(str, "cvmfs/"),
    "repositories.domain": Field(str, "", doc="if set, provisioning accepts only <name>.<domain>"),
    "sync.max_parallel": Field(int, 4, _positive),
    "sync.max_attempts": Field(int, 5, _positive),
    "sync.retry_initial_delay": Field(float, 10.0, _positive),
    "sync.retry_max_delay": Field(float, 600.0, _positive),
    "sync.full_reconcile_interval": Field(float, 21600.0, _not_negative, doc="seconds between full syncs of each "
                                          "repository (0: never); docs/operator-guide.md says why 6 h"),
    "sync.full_sync_threshold": Field(int, 500, _not_negative, doc="a batch with this many distinct keys runs "
                                      "as one full sync (0: never)"),
    "ansible.project_dir": Field(str, doc="folder the playbook paths are relative to (the collection root)"),
    "ansible.provision_playbook": Field(str, "playbooks/provision_repository.yml"),
    "ansible.sync_playbook": Field(str, "playbooks/sync_repository.yml"),
    "ansible.extravars_files": Field(list, [], doc="vars files passed as -e @file (paths only, no secrets inside)"),
    "ansible.inventory": Field(str, ""),
    "ansible.playbook_bin": Field(str, "", doc="ansible-playbook to run; default: next to this Python, else PATH"),
    "ansible.env": Field(dict, {}),
    "ansible.timeout": Field(int, 3600, _positive),
    "ansible.keep_failed_runs": Field(int, 5, _not_negative),
    "ansible.verbosity": Field(int, 0, _not_negative),
    "state_dir": Field(str, "/var/lib/cvmfs-publisher"),
    "shutdown_grace": Field(float, 30.0, _not_negative),
    "cluster.host_id": Field(str, "", doc="this publisher host's name among the others (default: host name)"),
    "cluster.management_urls": Field(list, [], doc="RabbitMQ management API base URLs (any cluster node); "
                                     "needed to spread the repositories over the hosts"),
    "cluster.spread_interval": Field(float, 10.0, _not_negative, doc="seconds between two looks at who is "
                                     "active for what (0: never give up a repository)"),
    "metrics.address": Field(str, "127.0.0.1"),
    "metrics.port": Field(int, 9417, _port, doc="0 disables the metrics and health endpoint"),
    "log.level": Field(str, "INFO", _log_level),
}


class Config:
    """Validated settings, read as ``config["amqp.host"]`` or ``config.section("amqp")``."""

    def __init__(self, values: Dict[str, Any], path: str = ""):
        self._values = values
        self.path = path

    def __getitem__(self, key):
        return self._values[key]

    def section(self, name) -> Dict[str, Any]:
        prefix = name + "."
        return {k[len(prefix):]: v for k, v in self._values.items() if k.startswith(prefix)}

    def as_dict(self) -> Dict[str, Any]:
        return dict(self._values)


def _flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        dotted = prefix + str(key)
        # A nested mapping is a section, except where the field itself is a mapping (ansible.env).
        if isinstance(value, dict) and dotted not in FIELDS:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def env_overrides(environ) -> Dict[str, Any]:
    overrides = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX):].lower().replace("__", ".")
        try:
            overrides[key] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            overrides[key] = raw
        if overrides[key] is None:
            overrides[key] = ""
    return overrides


def _coerce(key, field, value):
    if field.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if field.kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, field.kind) or (field.kind is int and isinstance(value, bool)):
        raise ConfigError("%s: expected %s, got %r" % (key, field.kind.__name__, value))
    if field.check:
        problem = field.check(value)
        if problem:
            raise ConfigError("%s: %s (got %r)" % (key, problem, value))
    return value


def _readable_file(values, key, what):
    path = values[key]
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ConfigError("%s: %s %r is not a readable file" % (key, what, path))


def _check_relations(values):
    """Checks that involve several keys or the filesystem."""
    _readable_file(values, "amqp.password_file", "password file")
    if values["amqp.tls"]:
        if not values["amqp.ca_cert"]:
            raise ConfigError("amqp.ca_cert: required when amqp.tls is true (the broker's certificate is verified)")
        _readable_file(values, "amqp.ca_cert", "CA bundle")
    if bool(values["amqp.client_cert"]) != bool(values["amqp.client_key"]):
        raise ConfigError("amqp.client_cert and amqp.client_key: set both or neither")
    for key in ("amqp.client_cert", "amqp.client_key"):
        if values[key]:
            _readable_file(values, key, "TLS file")
    if values["amqp.reconnect_max_delay"] < values["amqp.reconnect_initial_delay"]:
        raise ConfigError("amqp.reconnect_max_delay: must be at least amqp.reconnect_initial_delay")
    if values["sync.retry_max_delay"] < values["sync.retry_initial_delay"]:
        raise ConfigError("sync.retry_max_delay: must be at least sync.retry_initial_delay")
    if values["queues.dead_letter"] == values["queues.publisher"]:
        raise ConfigError("queues.dead_letter: must differ from queues.publisher")
    if values["queues.registry"] in (values["queues.publisher"], values["queues.dead_letter"]):
        raise ConfigError("queues.registry: must differ from queues.publisher and queues.dead_letter")
    for index, entry in enumerate(values["amqp.fallback_hosts"]):
        host, _colon, port = str(entry).rpartition(":")
        if not isinstance(entry, str) or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ConfigError("amqp.fallback_hosts[%d]: expected host:port, got %r" % (index, entry))
    for index, url in enumerate(values["cluster.management_urls"]):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError("cluster.management_urls[%d]: expected an http(s) URL such as "
                              "https://rabbit1:15671, got %r" % (index, url))
    if not re.match(r"^[A-Za-z0-9_.@:-]{0,128}$", values["cluster.host_id"]):
        raise ConfigError("cluster.host_id: up to 128 letters, digits, '_', '.', '@', ':' or '-' (got %r)"
                          % values["cluster.host_id"])
    if not os.path.isdir(values["ansible.project_dir"]):
        raise ConfigError("ansible.project_dir: %r is not a directory" % values["ansible.project_dir"])
    for key in ("ansible.provision_playbook", "ansible.sync_playbook"):
        path = os.path.join(values["ansible.project_dir"], values[key])
        if not os.path.isfile(path):
            raise ConfigError("%s: playbook %r not found" % (key, path))
    for index, pattern in enumerate(values["repositories.include"]):
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError("repositories.include[%d]: expected a shell pattern such as '*.infn.it', got %r"
                              % (index, pattern))
    for index, path in enumerate(values["ansible.extravars_files"]):
        if not isinstance(path, str) or not os.path.isfile(path):
            raise ConfigError("ansible.extravars_files[%d]: %r is not a file" % (index, path))
    if values["repositories.prefix"] and not values["repositories.prefix"].endswith("/"):
        raise ConfigError("repositories.prefix: must end with '/' (got %r)" % values["repositories.prefix"])


def validate(raw: Dict[str, Any], check_files: bool = True) -> Dict[str, Any]:
    flat = _flatten(raw)
    unknown = sorted(set(flat) - set(FIELDS))
    if unknown:
        raise ConfigError("%s: unknown key (known keys: see consumer/README.md)" % unknown[0])
    values = {}
    for key, field in FIELDS.items():
        if key in flat:
            values[key] = _coerce(key, field, flat[key])
        elif field.default is REQUIRED:
            raise ConfigError("%s: required" % key)
        else:
            values[key] = field.default
    for name, value in values["ansible.env"].items():
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError("ansible.env.%s: expected a string, got %r" % (name, value))
    values["ansible.env"] = {str(k): str(v) for k, v in values["ansible.env"].items()}
    if check_files:
        _check_relations(values)
    return values


def load(path: Optional[str] = None, environ=None, check_files: bool = True) -> Config:
    """Read, override from the environment and validate; raise ConfigError with an operator-ready message."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(CONFIG_PATH_ENV) or DEFAULT_CONFIG_PATH
    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle) or {}
    except OSError as exc:
        raise ConfigError("cannot read configuration file %s: %s" % (path, exc.strerror)) from None
    except yaml.YAMLError as exc:
        raise ConfigError("configuration file %s is not valid YAML: %s" % (path, exc)) from None
    if not isinstance(raw, dict):
        raise ConfigError("configuration file %s: expected a mapping at the top level" % path)
    flat = _flatten(raw)
    flat.update(env_overrides(environ))
    return Config(validate(_unflatten(flat), check_files=check_files), path=path)


def _unflatten(flat):
    tree: Dict[str, Any] = {}
    for dotted, value in flat.items():
        node = tree
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError("%s: expected a section, got a value" % ".".join(parts[:-1]))
        node[parts[-1]] = value
    return tree


def read_secret(path: str) -> str:
    """The content of a secret file, stripped. The error names the file, never its content."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError as exc:
        raise ConfigError("cannot read secret file %s: %s" % (path, exc.strerror)) from None


def listed(values) -> List[str]:
    return ["%s = %r" % (key, values[key]) for key in sorted(values)]
