#!/usr/bin/env python3
"""Benchmark of the Event-Driven Ansible path: event-to-published latency through ansible-rulebook.

    DEVSTACK_DIR=... DEVSTACK_PORT_BASE=... .venv/bin/python bench/eda.py [--uploads 10]

Measured exactly as bench/consumer.py measures the daemon (its ``measure_latency``): one 1 KiB upload at a time,
the time from the PUT returning to the file being in the published tree (RGW notification -> RabbitMQ -> the
``repository_queues`` source -> the rule engine -> ``run_playbook`` sync_repository.yml -> publish). Needs
.venv-eda (``make eda-venv``). Uses the stack in $DEVSTACK_DIR (starting one if needed). Prints figures and ends
with one line of JSON; never asserts a time.
"""
import argparse
import importlib.util
import json
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_consumer = _load("bench_consumer", REPO_ROOT / "bench" / "consumer.py")   # measure_latency, latency_summary
bench_sync = bench_consumer.bench_sync                                           # the stack and S3
eda = _load("eda_e2e", REPO_ROOT / "tests" / "integration" / "test_eda.py")      # the ansible-rulebook harness
log = bench_consumer.log


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=10)
    args = parser.parse_args()
    stack, started_here = bench_sync.ensure_stack()
    s3 = bench_sync.s3_client(stack)
    tag = "e" + secrets.token_hex(3)
    names = {"publisher": "publisher-" + tag, "dlq": tag + ".dlq"}
    results = {"uploads": args.uploads}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-eda-") as folder:
            rulebook = eda.Rulebook(stack, Path(folder), names, ["%s*.infn.it" % tag])
            rulebook.start()
            try:
                log("provisioning %s.infn.it through the rulebook" % tag)
                fqrn = eda.provision(stack, s3, rulebook, names, tag)
                log("latency of a 1 KiB upload, %d times:" % args.uploads)
                latencies = bench_consumer.measure_latency(stack, s3, rulebook, fqrn, tag, args.uploads)
                results.update(bench_consumer.latency_summary(latencies))
                log("latency through ansible-rulebook: p50 %.2f s, p95 %.2f s, max %.2f s" % (
                    results["latency_p50_s"], results["latency_p95_s"], results["latency_max_s"]))
            finally:
                rulebook.stop()
    finally:
        if started_here:
            subprocess.run([bench_sync.STACK, "down"], check=False)
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
