"""Prometheus metrics and the health endpoint, served on ``metrics.address:metrics.port``.

``/metrics`` is the Prometheus text format; ``/healthz`` answers 200 while the daemon is connected to
RabbitMQ and its I/O loop is turning, 503 otherwise (for systemd watchdogs, load balancers, Kubernetes probes);
``/`` is the read-only status page (statuspage.py) when the daemon gives one.
"""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# How long the I/O loop may be silent before /healthz says unhealthy.
LOOP_STALL_SECONDS = 30.0
# The ``queue`` label of the message counters: the provisioning queue, or any repository's queue.
PUBLISHER = "publisher"
REPOSITORY = "repository"


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("cvmfs_publisher_events_received", "Messages received", ["queue"], registry=r)
        self.acked = Counter("cvmfs_publisher_events_acked", "Messages acked after their work was done (or was "
                             "nothing to do)", ["queue"], registry=r)
        self.ignored = Counter("cvmfs_publisher_events_ignored", "Event records skipped: another bucket, outside "
                               "the prefix, not a change", registry=r)
        self.dead_lettered = Counter("cvmfs_publisher_events_dead_lettered", "Messages sent to the dead-letter "
                                     "queue", ["queue", "cause"], registry=r)
        self.objects_refused = Counter("cvmfs_publisher_objects_refused", "Objects the publisher refused (never "
                                       "published as they are), by cause: key, tarball, limit, corrupt, conflict, "
                                       "ingest", ["repository", "reason"], registry=r)
        self.retried = Counter("cvmfs_publisher_events_retried", "Messages put back for a later attempt",
                               ["queue"], registry=r)
        self.runs = Counter("cvmfs_publisher_runs", "ansible-runner runs", ["playbook", "outcome"], registry=r)
        self.run_duration = Histogram("cvmfs_publisher_run_duration_seconds", "Duration of ansible-runner runs",
                                      ["playbook"], registry=r,
                                      buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600))
        self.batch_size = Histogram("cvmfs_publisher_batch_size", "Distinct keys per changes run, messages per "
                                    "other run", ["mode"], registry=r,
                                    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000))
        self.last_publish = Gauge("cvmfs_publisher_last_publish_timestamp_seconds", "Time of the last successful "
                                  "sync run per repository", ["repository"], registry=r)
        self.runs_in_progress = Gauge("cvmfs_publisher_runs_in_progress", "Runs executing now", registry=r)
        self.connected = Gauge("cvmfs_publisher_amqp_connected", "1 while connected to RabbitMQ", registry=r)
        self.repositories = Gauge("cvmfs_publisher_repositories_consumed", "Repository queues consumed",
                                  registry=r)
        self.queue_messages = Gauge("cvmfs_publisher_repository_queue_messages", "Messages ready in the "
                                    "repository's queue (probed every few seconds)", ["repository"], registry=r)
        self.pending_messages = Gauge("cvmfs_publisher_repository_pending_messages", "Messages of the repository "
                                      "the daemon holds, not yet settled (waiting or in a run)", ["repository"],
                                      registry=r)
        self.dead_letter_messages = Gauge("cvmfs_publisher_dead_letter_queue_messages", "Messages in the "
                                          "dead-letter queue", registry=r)
        self.provisioning_messages = Gauge("cvmfs_publisher_provisioning_queue_messages", "Messages ready in the "
                                           "provisioning queue", registry=r)
        self.active = Gauge("cvmfs_publisher_repository_active", "1 where this host is the active consumer (the "
                            "one writer) of the repository's queue, 0 where it waits as a standby", ["repository"],
                            registry=r)
        self.hosts = Gauge("cvmfs_publisher_hosts_active_repositories", "Repositories each live publisher host "
                           "is active for, as this host last saw it", ["host"], registry=r)
        self.given_up = Counter("cvmfs_publisher_positions_given_up", "Active positions this host gave up to "
                                "another host to even out the spread", registry=r)
        self.provisioning_drift = Counter("cvmfs_publisher_provisioning_drift", "Periodic re-applies of a "
                                          "repository's provisioning that had to change something (repaired)",
                                          ["repository"], registry=r)
        self._alive = 0.0
        self.is_connected = False

    def set_connected(self, connected: bool):
        self.is_connected = connected
        self.connected.set(1 if connected else 0)

    def set_placement(self, placement, repositories):
        """``placement`` is spread.summary(); ``repositories`` maps queue (short name) to fqrn."""
        self.active.clear()
        for queue in placement["active"]:
            self.active.labels(repositories.get(queue, queue)).set(1)
        for queue in placement["standby"]:
            self.active.labels(repositories.get(queue, queue)).set(0)
        self.hosts.clear()
        for host, count in placement["hosts"].items():
            self.hosts.labels(host).set(count)

    def tick(self):
        self._alive = time.monotonic()

    def healthy(self) -> bool:
        return self.is_connected and time.monotonic() - self._alive < LOOP_STALL_SECONDS

    def serve(self, address: str, port: int, page: Optional[Callable[[], bytes]] = None) -> ThreadingHTTPServer:
        """Serve in a daemon thread; ``page`` (if given) renders the status page at ``/``."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 -- http.server's naming
                if self.path == "/metrics":
                    self._reply(200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry))
                elif self.path == "/healthz":
                    healthy = metrics.healthy()
                    body = json.dumps({"status": "ok" if healthy else "unhealthy"}).encode()
                    self._reply(200 if healthy else 503, "application/json", body)
                elif self.path in ("/", "/index.html") and page:
                    # Nothing but inline style may load or run, even if a value slipped past the escaping.
                    self._reply(200, "text/html; charset=utf-8", page(), {
                        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
                        "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})
                else:
                    self._reply(404, "text/plain", b"not found\n")

            def _reply(self, code, content_type, body, headers=None):
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args):  # scrapes are not worth a log line each
                pass

        server = ThreadingHTTPServer((address, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        return server
