"""The monitoring kit (docs/monitoring/) speaks of metrics the daemon really exports, and its JSON is a dashboard.

`make lint` checks the rules with promtool (syntax and `promtool test rules`); this checks the names, which
promtool cannot: a renamed metric would otherwise leave an alert that never fires.
"""
import json
import re
from pathlib import Path

import yaml
from prometheus_client import generate_latest

from cvmfs_publisher_consumer.metrics import Metrics

MONITORING = Path(__file__).resolve().parents[2] / "docs" / "monitoring"
METRIC = re.compile(r"\b(cvmfs_publisher_[a-z_]+)")


def exported():
    metrics = Metrics()
    # Labelled metrics appear in the exposition only once a child exists; the TYPE lines name them all.
    text = generate_latest(metrics.registry).decode()
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            names.add(name)
            if kind == "counter":
                names.add(name + "_total")
            if kind == "histogram":
                names.update({name + "_bucket", name + "_sum", name + "_count"})
    return names


def referenced(text):
    return set(METRIC.findall(text))


def test_alert_rules_and_dashboard_use_only_exported_metrics():
    known = exported()
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    alerts = {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}
    for wanted in ("CvmfsPublisherRepositoryBehind", "CvmfsPublisherDeadLettersGrowing",
                   "CvmfsPublisherDisconnected", "CvmfsPublisherObjectsRefused"):
        assert wanted in alerts
    for name, expr in alerts.items():
        assert referenced(expr) <= known, (name, referenced(expr) - known)
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert exprs and all(referenced(expr) <= known for expr in exprs), [referenced(e) - known for e in exprs]
    assert {"cvmfs_publisher_repository_queue_messages", "cvmfs_publisher_last_publish_timestamp_seconds",
            "cvmfs_publisher_dead_letter_queue_messages"} <= set().union(*map(referenced, exprs))
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
