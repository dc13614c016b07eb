import json
import socket
import urllib.error
import urllib.request

from cvmfs_publisher_consumer.metrics import Metrics


def get(port, path):
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_health_follows_the_connection_and_metrics_are_served():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    metrics = Metrics()
    server = metrics.serve("127.0.0.1", port)
    try:
        assert get(port, "/healthz") == (503, json.dumps({"status": "unhealthy"}))
        metrics.set_connected(True)
        metrics.tick()
        assert get(port, "/healthz") == (200, json.dumps({"status": "ok"}))
        metrics.runs.labels("playbooks/sync_repository.yml", "successful").inc()
        metrics.last_publish.labels("alice.infn.it").set(1234)
        status, text = get(port, "/metrics")
        assert status == 200
        assert 'cvmfs_publisher_runs_total{outcome="successful",playbook="playbooks/sync_repository.yml"} 1.0' in text
        assert 'cvmfs_publisher_last_publish_timestamp_seconds{repository="alice.infn.it"} 1234.0' in text
        for name, kind in (("cvmfs_publisher_events_received_total", "counter"),
                           ("cvmfs_publisher_events_dead_lettered_total", "counter"),
                           ("cvmfs_publisher_run_duration_seconds", "histogram"),
                           ("cvmfs_publisher_batch_size", "histogram")):
            assert "# TYPE %s %s" % (name, kind) in text
        assert get(port, "/other")[0] == 404
    finally:
        server.shutdown()
