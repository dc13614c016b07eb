"""Many publisher hosts on the local stack: three daemons as three hosts (each its own cvmfs root and keys, one shared
stand-in gateway folder, the stack's RabbitMQ), ten repositories provisioned by messages, a host killed during a
burst, a fourth host joining. Figures (spread, time to converge, failover) are printed: run with ``-s`` to see them.
"""
import json
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pika
import pytest
import yaml

from helpers import consumer_e2e, stack_vars_file

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "devstack"))
import standin  # noqa: E402  (the stand-in's read API for tests)

from cvmfs_publisher_consumer import amqp  # noqa: E402


e2e = consumer_e2e()

pytestmark = pytest.mark.slow
REPOSITORIES = 10
SPREAD_INTERVAL = 2
# A host killed inside a transaction leaves its gateway lease behind: the gateway's max_lease_time (the stand-in's
# CVMFS_STANDIN_LEASE_SECONDS) bounds how long the repository's new writer retries (lease busy) before it can publish.
LEASE_SECONDS = 20
WAIT = 900   # generous bound of every wait; the figures printed are what the run actually took


class Host:
    """One publisher host: its own cvmfs root (repositories.d, keys, spool) and cvmfs_server, the shared gateway."""

    def __init__(self, stack, folder, name, gateway_dir, queues, include, registry, extra_vars=None, **settings):
        self.name = name
        home = folder / "hosts" / name
        self.root = home / "root"
        self.root.mkdir(parents=True)
        wrapper = home / "cvmfs_server"
        wrapper.write_text(
            "#!/bin/sh\n# stand-in cvmfs_server of publisher host %s (test)\n"
            "export CVMFS_STANDIN_ROOT='%s' CVMFS_STANDIN_GATEWAY_DIR='%s'\n"
            "export CVMFS_STANDIN_PUBLISHER='%s' CVMFS_STANDIN_LEASE_SECONDS=%d\n"
            "exec '%s' '%s' \"$@\"\n" % (name, self.root, gateway_dir, name, LEASE_SECONDS, sys.executable,
                                       REPO_ROOT / "devstack" / "cvmfs_server"))
        wrapper.chmod(0o755)
        host_vars = home / "host-vars.yml"
        host_vars.write_text(yaml.safe_dump(dict({"cvmfs_publisher_cvmfs_root": str(self.root),
                                                  "cvmfs_publisher_cvmfs_server_bin": str(wrapper)},
                                                 **(extra_vars or {}))))
        settings.setdefault("cluster__management_urls", [stack["RABBITMQ_API_URL"]])
        self.daemon = e2e.DaemonProcess(
            stack, home, "daemon", queues["publisher"], queues["dlq"], include,
            ansible__extravars_files=[stack_vars_file(), str(host_vars)],
            repositories__config_dir=str(self.root / "etc/cvmfs/repositories.d"),
            queues__registry=registry, cluster__host_id=name, cluster__spread_interval=SPREAD_INTERVAL,
            amqp__heartbeat=5, sync__max_attempts=20, sync__retry_max_delay=5, sync__full_reconcile_interval=0,
            **settings)

    def provisioned(self):
        """The repositories whose provisioning run succeeded on this host (the bucket notifies from then on)."""
        return sorted({e["repository"] for e in self.daemon.events()
                       if e.get("event") == "run_succeeded" and e.get("mode") == "provision"})

    def repositories(self):
        folder = self.root / "etc/cvmfs/repositories.d"
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def active_by_host(stack, queues):
    """{queue: host} of the active consumers the broker reports for ``queues`` (management API)."""
    password = Path(stack["AMQP_PASSWORD_FILE"]).read_text().strip()
    manager = urllib.request.HTTPPasswordMgrWithDefaultRealm()
    manager.add_password(None, stack["RABBITMQ_API_URL"], stack["AMQP_USER"], password)
    opener = urllib.request.build_opener(urllib.request.HTTPBasicAuthHandler(manager))
    with opener.open(stack["RABBITMQ_API_URL"] + "/api/consumers/%2F", timeout=10) as response:
        consumers = json.load(response)
    return {c["queue"]["name"]: amqp.host_of_tag(c["consumer_tag"]) for c in consumers
            if c["queue"]["name"] in queues and c.get("active") and amqp.host_of_tag(c["consumer_tag"])}


def spread_of(active, hosts):
    return sorted((sum(1 for h in active.values() if h == host) for host in hosts), reverse=True)


def wait_until(check, what, timeout=WAIT, interval=0.25):
    started = time.monotonic()
    while True:
        value = check()
        if value:
            return value, time.monotonic() - started
        if time.monotonic() - started > timeout:
            pytest.fail("%s (after %ss)" % (what, timeout))
        time.sleep(interval)


def wait_spread(stack, queues, hosts, expected):
    def settled():
        active = active_by_host(stack, queues)
        return active if len(active) == len(queues) and spread_of(active, hosts) == expected else None
    return wait_until(settled, "the active consumers never spread %s over %s: last %s" % (
        expected, hosts, active_by_host(stack, queues)))


def published(stack, host, fqrn, gateway_dir):
    try:
        tree = standin.published_tree(str(host.root), fqrn, gateway_dir=str(gateway_dir))
    except Exception:  # noqa: BLE001 -- nothing published yet
        return {}
    return {path: value for path, value in tree.items() if value != "dir"}


def wait_all_published(stack, s3, host, names, gateway_dir):
    expected = {name: e2e.bucket_files(s3, name) for name in names}

    def matching():
        return all(published(stack, host, name + ".infn.it", gateway_dir) == expected[name] for name in names)
    wait_until(matching, "bucket != published tree for some of %s" % names, interval=1)


def overlapping_runs(hosts, fqrn, killed):
    """Pairs of sync runs of ``fqrn`` on two hosts that overlapped in time (a killed host's runs end at its kill)."""
    intervals = []
    for host in hosts:
        intervals += [(start, end, host.name) for start, end in
                      e2e._run_intervals(host.daemon, fqrn, killed.get(host.name))]
    intervals.sort()
    return [(a, b) for a, b in zip(intervals, intervals[1:]) if b[0] < a[1] and a[2] != b[2]]


@pytest.fixture
def cluster_hosts(stack, tmp_path, unique_name):
    made = []
    queues = {"publisher": "publisher-" + unique_name, "dlq": unique_name + ".dlq"}
    gateway_dir = tmp_path / "gateway"

    def make(name, **settings):
        host = Host(stack, tmp_path, name, gateway_dir, queues, ["%s*.infn.it" % unique_name],
                    unique_name + ".registry", **settings)
        made.append(host)
        return host

    make.queues, make.gateway_dir = queues, gateway_dir
    yield make
    secrets = e2e.stack_secrets(stack)
    for host in made:
        if host.daemon.process and host.daemon.process.poll() is None:
            host.daemon.stop()
    for host in made:
        host.daemon.assert_no_secret(secrets)


def test_three_hosts_spread_fail_over_and_a_fourth_joins(stack, s3, cluster_hosts, unique_name):
    names = ["%s-r%d" % (unique_name, i) for i in range(REPOSITORIES)]
    fqrns = [name + ".infn.it" for name in names]
    a, b, c = (cluster_hosts(name) for name in ("host-a", "host-b", "host-c"))
    for host in (a, b, c):
        host.daemon.start()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda name: e2e.seed_keys(stack, name + ".infn.it", "sub-" + name), names))
    for name in names:
        s3.create_bucket(Bucket=name)
        e2e.publish(stack, cluster_hosts.queues["publisher"], "%s,sub-%s,%s.infn.it,P" % (name, name, name))

    # Every request reaches every host (the registry), every host consumes every repository.
    _, provisioned = wait_until(lambda: all(h.provisioned() == sorted(fqrns) for h in (a, b, c)),
                                "the 10 repositories were not provisioned on all three hosts", interval=1)
    assert all(h.repositories() == sorted(fqrns) for h in (a, b, c))
    for host in (a, b, c):
        host.daemon.wait_for(lambda e: e.get("event") == "consuming" and e.get("queue") in names,
                             "%s does not consume every repository" % host.name, count=REPOSITORIES)
    hosts = [h.name for h in (a, b, c)]
    active, spread_time = wait_spread(stack, names, hosts, [4, 3, 3])
    print("\n3 hosts: 10 repositories on all three after %.1f s; active consumers %s after %.1f s more"
          % (provisioned, spread_of(active, hosts), spread_time))

    # A burst on every repository; kill -9 a host that is active for some while it runs.
    burst = {name: {"cvmfs/burst/f%02d" % i: b"%s %d\n" % (name.encode(), i) for i in range(20)} for name in names}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda name: e2e.upload_many(s3, name, burst[name], workers=4), names))
    victim = b
    victim.daemon.wait_for(lambda e: e.get("event") == "run_started" and e.get("mode") in ("changes", "full"),
                           "host-b never started a sync")
    lost = sorted(q for q, host in active_by_host(stack, names).items() if host == victim.name)
    killed_at = time.time()
    victim.daemon.kill()
    survivors = [a.name, c.name]

    def moved():
        now = active_by_host(stack, names)
        return len(now) == len(names) and set(now.values()) <= set(survivors)
    _, failover = wait_until(moved, "host-b's repositories %s never became active elsewhere" % lost, interval=0.1)
    print("kill -9 of host-b (active for %d): all its repositories active on another host %.1f s later"
          % (len(lost), failover))
    wait_all_published(stack, s3, a, names, cluster_hosts.gateway_dir)
    for fqrn in fqrns:
        assert not overlapping_runs((a, b, c), fqrn, {victim.name: killed_at}), fqrn
        assert not standin.in_transaction(str(a.root), fqrn) and not standin.in_transaction(str(c.root), fqrn)
    assert not e2e.drain_queue(stack, cluster_hosts.queues["dlq"])
    active, _ = wait_spread(stack, names, survivors, [5, 5])

    # A fourth host joins: it provisions everything from the registry by itself and takes its share.
    d = cluster_hosts("host-d")
    d.daemon.start()
    _, joined = wait_until(lambda: d.provisioned() == sorted(fqrns), "host-d never provisioned the registry",
                           interval=1)
    assert d.repositories() == sorted(fqrns)
    live = [a.name, c.name, d.name]
    active, spread_time = wait_spread(stack, names, live, [4, 3, 3])
    took = sorted(q for q, host in active.items() if host == d.name)
    print("host-d joined: 10 repositories provisioned from the registry in %.1f s, active for %d after %.1f s more; "
          "spread %s" % (joined, len(took), spread_time, spread_of(active, live)))
    assert len(took) >= 3
    for name in names:
        s3.put_object(Bucket=name, Key="cvmfs/after-join.txt", Body=name.encode())
    wait_all_published(stack, s3, d, names, cluster_hosts.gateway_dir)
    for name in took:
        assert d.daemon.runs(name + ".infn.it"), "host-d is active for %s but never synced it" % name


# -- a three-node RabbitMQ cluster with one node stopped during a burst ---------------------------------------------

CLUSTER_CMD = REPO_ROOT / "devstack" / "cluster"


def _cluster(*args, timeout=300):
    proc = subprocess.run([str(CLUSTER_CMD), *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, "devstack/cluster %s: %s%s" % (" ".join(args), proc.stdout, proc.stderr)
    return proc.stdout


@pytest.fixture
def rabbit_cluster(stack):
    """Three RabbitMQ nodes on loopback (devstack/cluster), next to the stack; stopped and removed afterwards."""
    _cluster("down")
    _cluster("up")
    try:
        yield json.loads(_cluster("env"))
    finally:
        _cluster("down")


def publish_to(port, queue, body):
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", queue, body.encode(), pika.BasicProperties(delivery_mode=2), mandatory=True)
    finally:
        connection.close()


def test_a_broker_node_stopped_during_a_burst_loses_nothing(stack, s3, rabbit_cluster, cluster_hosts, unique_name):
    node1, node2, node3 = rabbit_cluster["AMQP_PORTS"]
    api1, api2, api3 = rabbit_cluster["MANAGEMENT_URLS"]
    # RGW pushes to node 1 and the playbooks manage queues through node 1; the daemon talks to node 2 first.
    host = cluster_hosts("host-x", extra_vars={"cvmfs_publisher_rabbitmq_api_url": api1,
                                               "cvmfs_publisher_topic_push_endpoint": "amqp://127.0.0.1:%d" % node1},
                         amqp__port=node2, amqp__fallback_hosts=["127.0.0.1:%d" % node3, "127.0.0.1:%d" % node1],
                         cluster__management_urls=[api2, api3, api1])
    host.daemon.start()
    names = ["%s-q%d" % (unique_name, i) for i in range(2)]
    for name in names:
        e2e.seed_keys(stack, name + ".infn.it", "sub-" + name)
        s3.create_bucket(Bucket=name)
        publish_to(node1, cluster_hosts.queues["publisher"], "%s,sub-%s,%s.infn.it,P" % (name, name, name))
    wait_until(lambda: host.provisioned() == sorted(n + ".infn.it" for n in names), "provisioning never finished")
    for name in names:
        host.daemon.wait_for(lambda e, n=name: e.get("event") == "consuming" and e.get("queue") == n,
                             "%s is not consumed" % name)
    members = json.loads(urllib.request.urlopen(urllib.request.Request(
        api1 + "/api/queues/%2F/" + names[0], headers={"Authorization": "Basic Z3Vlc3Q6Z3Vlc3Q="}),
        timeout=10).read())["members"]
    assert sorted(members) == sorted(rabbit_cluster["NODES"]), "the quorum queue is not replicated on every node"

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda name: e2e.upload_many(s3, name, {"cvmfs/before/f%03d" % i: b"%d\n" % i
                                                               for i in range(100)}, workers=8), names))
    host.daemon.wait_for(lambda e: e.get("event") == "run_started" and e.get("mode") in ("changes", "full"),
                         "no sync started")
    stopped_at = time.monotonic()
    _cluster("stop-node", "2")
    host.daemon.wait_for(lambda e: e.get("event") == "connected", "the daemon never reconnected", count=2)
    reconnected = time.monotonic() - stopped_at
    for name in names:
        e2e.upload_many(s3, name, {"cvmfs/after/f%03d" % i: b"%d\n" % i for i in range(20)}, workers=8)
    started = time.monotonic()
    wait_all_published(stack, s3, host, names, cluster_hosts.gateway_dir)
    print("\ncluster: node 2 stopped during a burst of 2 x 100 uploads; the daemon was on node 3 %.1f s later; "
          "bucket = published tree for both %.1f s after the last upload" % (reconnected, time.monotonic() - started))
    assert not e2e.drain_queue(dict(stack, AMQP_PORT=str(node1)), cluster_hosts.queues["dlq"])
