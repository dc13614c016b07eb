"""``cvmfs-publisher run | status | check-config | dlq ...`` (exit 2 on a bad configuration)."""
import argparse
import datetime
import importlib.metadata
import json
import logging
import sys

from . import dlq, logs
from .config import ConfigError, listed, load
from .redact import known_secrets
from .status import StatusFile

EXIT_CONFIG = 2


def _when(timestamp) -> str:
    if not timestamp:
        return "never"
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def cmd_check_config(config, _args) -> int:
    print("configuration %s is valid" % config.path)
    for line in listed(config.as_dict()):
        print("  " + line)
    return 0


def cmd_run(config, _args) -> int:
    from .daemon import Daemon  # pika, ansible-runner: only for the commands that need them
    logs.setup(config["log.level"], secrets=known_secrets(config))
    try:
        return Daemon(config).run()
    except ConfigError as exc:
        logging.getLogger("cvmfs_publisher").error("%s", exc, extra=logs.fields(event="config_error"))
        return EXIT_CONFIG


def cmd_status(config, args) -> int:
    from . import amqp
    from .depths import queue_depths
    from .repositories import discover_repositories
    status = StatusFile.read(config["state_dir"]) or {}
    known = status.get("repositories", {})
    provisioned = discover_repositories(config["repositories.config_dir"], config["repositories.include"])
    repositories = sorted(set(known) | set(provisioned.values()))
    queues = [config["queues.publisher"], config["queues.dead_letter"]] + [r.split(".", 1)[0] for r in repositories]
    rc = 0
    try:
        depths = queue_depths(config, queues)
    except amqp.CONNECTION_ERRORS as exc:
        print("cannot reach RabbitMQ at %s:%s (%s): queue depths unknown" % (
            config["amqp.host"], config["amqp.port"], type(exc).__name__), file=sys.stderr)
        depths, rc = {}, 1
    rows = []
    for fqrn in repositories:
        entry = known.get(fqrn, {})
        rows.append({"repository": fqrn, "queue_depth": depths.get(fqrn.split(".", 1)[0]),
                     "last_publish": entry.get("last_publish"), "last_error": entry.get("last_error"),
                     "last_error_at": entry.get("last_error_at"), "refusals": entry.get("refusals") or [],
                     "refusals_count": entry.get("refusals_count", len(entry.get("refusals") or []))})
    cluster = {k: status.get(k) for k in ("host", "active", "standby", "hosts")}
    if args.json:
        print(json.dumps({"daemon": {k: status.get(k) for k in ("pid", "updated", "connected", "runs_in_progress")},
                          "queues": {q: depths.get(q) for q in queues[:2]}, "repositories": rows,
                          "cluster": cluster}, indent=1))
        return rc
    print("daemon: pid %s, %s, status written %s" % (
        status.get("pid", "?"), "connected" if status.get("connected") else "not connected",
        _when(status.get("updated"))))
    for name in queues[:2]:
        print("queue %s: %s waiting" % (name, "?" if depths.get(name) is None else depths[name]))
    if cluster["hosts"]:
        print("host %s: active for %d, standby for %d; active per host: %s" % (
            cluster["host"], len(cluster["active"] or []), len(cluster["standby"] or []),
            ", ".join("%s %d" % item for item in sorted(cluster["hosts"].items()))))
    print("%-40s %8s  %-21s %s" % ("REPOSITORY", "QUEUED", "LAST PUBLISH", "LAST ERROR"))
    for row in rows:
        depth = "?" if row["queue_depth"] is None else row["queue_depth"]
        error = ("%s (%s)" % (row["last_error"], _when(row["last_error_at"]))) if row["last_error"] else "-"
        print("%-40s %8s  %-21s %s" % (row["repository"], depth, _when(row["last_publish"]), error))
    refused = [row for row in rows if row["refusals_count"]]
    if refused:
        print("refused objects (not published until they change; the uploader's report is in the bucket):")
    for row in refused:
        print("  %s: %d refused" % (row["repository"], row["refusals_count"]))
        for item in row["refusals"]:
            print("    %s: %s" % (item.get("key"), item.get("reason")))
        if row["refusals_count"] > len(row["refusals"]):
            print("    ... and %d more" % (row["refusals_count"] - len(row["refusals"])))
    return rc


def version() -> str:
    """The installed package's version: the collection's (consumer/setup.py reads it from galaxy.yml)."""
    try:
        return importlib.metadata.version("cvmfs-publisher-consumer")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cvmfs-publisher", description="Publish S3 buckets into CVMFS repositories, "
                                "driven by RabbitMQ events, through ansible-runner.")
    p.add_argument("-c", "--config", help="configuration file (default: $CVMFS_PUBLISHER_CONFIG or "
                   "/etc/cvmfs-publisher/config.yml)")
    p.add_argument("--version", action="version", version="%(prog)s " + version())
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the daemon (logs JSON lines to stdout; stops on SIGTERM)")
    status = sub.add_parser("status", help="per repository: queue depth, last publish, last error")
    status.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser("check-config", help="validate the configuration and print it")
    dlq.add_parser(sub)
    return p


def cmd_dlq(config, args) -> int:
    return dlq.run(config, args)


COMMANDS = {"run": cmd_run, "status": cmd_status, "check-config": cmd_check_config, "dlq": cmd_dlq}


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as exc:
        print("cvmfs-publisher: invalid configuration: %s" % exc, file=sys.stderr)
        return EXIT_CONFIG
    return COMMANDS[args.command](config, args)


if __name__ == "__main__":
    sys.exit(main())
