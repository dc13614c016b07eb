"""A three-node RabbitMQ cluster on loopback, next to the local stack, for tests that lose a broker node.

    devstack/cluster up | down | status | stop-node N | start-node N | env      (N = 1, 2 or 3)

Folder ``$DEVSTACK_CLUSTER_DIR`` (default ``$DEVSTACK_DIR/../cluster``); ports from ``$DEVSTACK_PORT_BASE``: node N
listens for AMQP on base+100+10(N-1), for the management API on base+101+10(N-1), for Erlang distribution on
base+102+10(N-1); the nodes share their own epmd on base+140 and an Erlang cookie. They form the cluster by
themselves (classic_config peer discovery); quorum queues and streams declared afterwards get a member on each node,
so the cluster keeps serving them with one node down. ``stop-node`` stops a node's Erlang VM (SIGTERM: a clean stop),
``start-node`` starts it again and it rejoins. ``down`` stops every process it started, by PID, and deletes the folder.
Like the rest of devstack/, a test instrument: guest/guest over loopback, statistics every second.
"""
import argparse
import base64
import json
import os
import secrets
import signal
import sys
import time

import rights
import stacklib
from stacklib import RABBITMQ_SERVER, Layout, StackError, State, is_alive, port_open

NODES = (1, 2, 3)
CLUSTER_OFFSET = 100
EPMD_OFFSET = 140
START_TIMEOUT = 120   # three Erlang VMs booting at once on a busy machine

# The cluster keeps RabbitMQ's default guest administrator (a test instrument on loopback); the stack's other
# identities are added with their rights (cmd_up).
GUEST_HEADERS = {"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()}


def node_name(n):
    return "rabbit-%d@localhost" % n


class ClusterLayout(Layout):
    """Paths and ports of one cluster; its own state.json (PIDs) like a stack's."""

    def __init__(self, directory=None, port_base=None):
        directory = directory or os.environ.get("DEVSTACK_CLUSTER_DIR") or os.path.join(
            os.path.dirname(os.path.abspath(os.environ.get("DEVSTACK_DIR") or os.path.join(
                stacklib.REPO_ROOT, ".devstack", "default"))), "cluster")
        super().__init__(directory, port_base)
        self.epmd_port = self.port_base + EPMD_OFFSET

    def port(self, n, what):
        return self.port_base + CLUSTER_OFFSET + 10 * (n - 1) + {"amqp": 0, "management": 1, "dist": 2}[what]

    def node_dir(self, n):
        return self.path("node-%d" % n)

    def api(self, n, suffix=""):
        return "http://127.0.0.1:%d%s" % (self.port(n, "management"), suffix)


def node_env(layout, n):
    return stacklib.rabbitmq_node_env(layout.node_dir(n), node_name(n), layout.port(n, "amqp"), layout.port(n, "dist"),
                                      layout.epmd_port)


def node_conf(layout, n):
    lines = ["# Node %d of the local test cluster (not the system service)." % n,
             "loopback_users = none",
             "listeners.tcp.1 = 127.0.0.1:%d" % layout.port(n, "amqp"),
             "management.tcp.ip = 127.0.0.1",
             "management.tcp.port = %d" % layout.port(n, "management"),
             "collect_statistics_interval = 1000",
             "cluster_formation.peer_discovery_backend = classic_config"]
    lines += ["cluster_formation.classic_config.nodes.%d = %s" % (m, node_name(m)) for m in NODES]
    return "\n".join(lines) + "\n"


def running_nodes(layout, n):
    """Names of the cluster's running nodes as node ``n`` sees them (empty if it does not answer)."""
    try:
        status, nodes = stacklib.http("GET", layout.api(n, "/api/nodes"), headers=GUEST_HEADERS,
                                      timeout=2)
    except OSError:
        return []
    return sorted(node["name"] for node in nodes or [] if node.get("running")) if status == 200 else []


def start_node(layout, state, n):
    proc = state.spawn("rabbit-%d" % n, [RABBITMQ_SERVER], env=node_env(layout, n))
    stacklib.wait_until(lambda: port_open(layout.port(n, "amqp")), "RabbitMQ node %d" % n,
                        os.path.join(layout.node_dir(n), "log"), timeout=START_TIMEOUT, procs=[proc])
    return proc


def cmd_up(layout, _args):
    if os.path.exists(layout.state_file):
        state = State(layout)
        if any(is_alive(record) for record in state.processes.values()):
            raise StackError("a cluster is already running in %s: `devstack/cluster down` first" % layout.dir)
        stacklib.wipe(layout)
    started = time.monotonic()
    ports = [layout.epmd_port] + [layout.port(n, what) for n in NODES for what in ("amqp", "management", "dist")]
    busy = [str(port) for port in ports if not stacklib.port_free(port)]
    if busy:
        raise StackError("port %s already in use on 127.0.0.1; choose another DEVSTACK_PORT_BASE" % ", ".join(busy))
    os.makedirs(layout.path("logs"), exist_ok=True)
    state = State(layout)
    state.save()
    cookie = secrets.token_hex(20)
    for n in NODES:
        d = layout.node_dir(n)
        stacklib.rabbitmq_node_folder(d, node_conf(layout, n))
        stacklib.write_private(os.path.join(d, ".erlang.cookie"), cookie)
        os.chmod(os.path.join(d, ".erlang.cookie"), 0o400)
    try:
        epmd = state.spawn("epmd", ["epmd", "-address", "127.0.0.1", "-port", str(layout.epmd_port)])
        stacklib.wait_until(lambda: port_open(layout.epmd_port), "epmd", layout.path("logs", "epmd.out"),
                            procs=[epmd])
        procs = [state.spawn("rabbit-%d" % n, [RABBITMQ_SERVER], env=node_env(layout, n)) for n in NODES]
        stacklib.wait_until(lambda: all(running_nodes(layout, n) == [node_name(m) for m in NODES] for n in NODES),
                            "the three-node RabbitMQ cluster", layout.dir, timeout=START_TIMEOUT, procs=procs)
        status, _ = stacklib.http("PUT", layout.api(1, "/api/exchanges/%2F/" + stacklib.AMQP_EXCHANGE),
                                  {"type": "topic", "durable": True, "auto_delete": False, "internal": False,
                                   "arguments": {}}, GUEST_HEADERS)
        if status not in (201, 204):
            raise StackError("cannot declare the %s exchange (HTTP %s)" % (stacklib.AMQP_EXCHANGE, status))
        # The stack's identities with the stack's passwords (its clients move to the cluster unchanged); guest stays
        # the cluster's administrator, and RGW logs in as guest.
        stack = Layout()
        stacklib.grant_rabbitmq_rights(layout.api(1, "/api/"), GUEST_HEADERS,
                                       lambda name: stacklib.read_secret(stack, name), skip=(rights.RGW_USER,))
    except BaseException:
        stop_all(layout, state, graceful=False)
        raise
    state.data["ready"] = True
    state.save()
    print("cluster up in %s in %.1f s: AMQP %s, management %s" % (
        layout.dir, time.monotonic() - started, ", ".join(str(layout.port(n, "amqp")) for n in NODES),
        ", ".join(str(layout.port(n, "management")) for n in NODES)))
    return 0


def stop_node(layout, state, n, graceful=True):
    """SIGTERM makes the Erlang VM stop the node cleanly (as `rabbitmqctl stop` would, without starting a
    second VM for the CLI); SIGKILL when not graceful or if it is still there after 60 s."""
    record = state.processes.get("rabbit-%d" % n)
    if is_alive(record):
        os.kill(record["pid"], signal.SIGTERM if graceful else signal.SIGKILL)
    deadline = time.monotonic() + 60
    while is_alive(record) and time.monotonic() < deadline:
        time.sleep(0.1)
    if is_alive(record):
        os.kill(record["pid"], signal.SIGKILL)


def stop_all(layout, state, graceful=True):
    """Every node at once (their data is deleted next: no need to be gentle), then epmd."""
    for n in NODES:
        stop_node(layout, state, n, graceful=False)
    record = state.processes.get("epmd")
    if is_alive(record):
        os.kill(record["pid"], signal.SIGTERM)


def cmd_down(layout, _args):
    if not os.path.exists(layout.state_file):
        print("no cluster in %s" % layout.dir)
        return 0
    stop_all(layout, State(layout))
    stacklib.wipe(layout)
    print("cluster in %s stopped and removed" % layout.dir)
    return 0


def cmd_stop_node(layout, args):
    stop_node(layout, State(layout), args.node)
    print("node %s stopped" % node_name(args.node))
    return 0


def cmd_start_node(layout, args):
    start_node(layout, State(layout), args.node)
    print("node %s started" % node_name(args.node))
    return 0


def cmd_status(layout, _args):
    state = State(layout)
    if not state.exists:
        print("no cluster in %s" % layout.dir)
        return 1
    up = True
    for n in NODES:
        alive = is_alive(state.processes.get("rabbit-%d" % n)) and port_open(layout.port(n, "amqp"))
        up = up and alive
        print("  %s %-4s AMQP %d management %d" % (node_name(n), "up" if alive else "down", layout.port(n, "amqp"),
                                                   layout.port(n, "management")))
    return 0 if up else 1


def cluster_env(layout):
    """What tests need: the nodes' AMQP ports and management URLs, the epmd port, the folder."""
    return {"CLUSTER_DIR": layout.dir, "AMQP_PORTS": [layout.port(n, "amqp") for n in NODES],
            "MANAGEMENT_URLS": [layout.api(n) for n in NODES], "NODES": [node_name(n) for n in NODES]}


def cmd_env(layout, _args):
    print(json.dumps(cluster_env(layout), indent=2))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="devstack/cluster", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (("up", cmd_up, "start the three nodes and wait until they form the cluster"),
                             ("down", cmd_down, "stop every node and epmd by PID, delete the folder"),
                             ("status", cmd_status, "each node up/down; exit 0 only if all are up"),
                             ("env", cmd_env, "ports and URLs as JSON")):
        sub.add_parser(name, help=text).set_defaults(func=func)
    for name, func in (("stop-node", cmd_stop_node), ("start-node", cmd_start_node)):
        node = sub.add_parser(name, help="%s one node (1, 2 or 3)" % name.split("-")[0])
        node.add_argument("node", type=int, choices=NODES)
        node.set_defaults(func=func)
    args = parser.parse_args(argv)
    try:
        return args.func(ClusterLayout(), args)
    except StackError as exc:
        print("devstack/cluster %s: error: %s" % (args.command, exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
