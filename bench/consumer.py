#!/usr/bin/env python3
"""Benchmark of the consumer daemon on the local stack: event-to-published latency and burst coalescing.

    DEVSTACK_DIR=... DEVSTACK_PORT_BASE=... .venv/bin/python bench/consumer.py [--uploads 20] [--burst 2000]

1. Latency: one 1 KiB upload at a time, ``--uploads`` times; the time from the PUT returning to the file being in
   the published tree (RGW notification -> RabbitMQ -> daemon -> ansible-runner -> sync_repository.yml -> publish).
   Goal: p50 <= 1.0 s. The daemon's own overhead is its run_started line's ``waited``: from the message's arrival
   to its run's start (the bench's topics are synchronous, so RGW delivers before the PUT even returns). Goal:
   <= 0.1 s.
2. Burst: ``--burst`` objects uploaded at once; time from the last PUT until all are published (goal <= 3 s) and
   the sync runs used (goal <= 10). Also compared with a `full` sync of the same objects into a fresh repository by
   ansible-playbook (an earlier goal: first PUT to all published <= 1.3 x full + 5 s).

Uses the stack in $DEVSTACK_DIR (starts one if it is down, and stops it at the end). Prints figures as it goes
and ends with one line of JSON. Never asserts a time: goals are reported, not enforced.
"""
import argparse
import importlib.util
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(0, str(REPO_ROOT / "tests" / "integration"))


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_sync = _load("bench_sync", REPO_ROOT / "bench" / "sync.py")          # stack and S3 helpers
e2e = _load("daemon_harness", REPO_ROOT / "tests" / "daemon_harness.py")  # the daemon harness
from helpers import run_playbook  # noqa: E402


def met(ok):
    return "met" if ok else "NOT met"


def log(text):
    print(text, flush=True)


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def latency_summary(latencies):
    """The results' latency fields: median, 95th percentile and maximum, in seconds to the millisecond."""
    return dict(latency_p50_s=round(statistics.median(latencies), 3),
                latency_p95_s=round(percentile(latencies, 0.95), 3), latency_max_s=round(max(latencies), 3))


def measure_latency(stack, s3, daemon, fqrn, bucket, uploads):
    """Per upload: (seconds until published, seconds its message waited in the daemon before its run started: the
    ``waited`` of the daemon's ``run_started`` log line)."""
    latencies, overheads = [], []
    for index in range(uploads):
        key = "cvmfs/latency/f%03d" % index
        path = key[len(e2e.PREFIX):]
        runs_before = len(daemon.runs(fqrn))
        s3.put_object(Bucket=bucket, Key=key, Body=secrets.token_bytes(1024))
        started = time.monotonic()
        while path not in e2e.published_files(stack, fqrn):
            if time.monotonic() - started > 300:
                raise RuntimeError("upload %s never published" % key)
            time.sleep(0.02)
        latencies.append(time.monotonic() - started)
        runs = daemon.runs(fqrn)[runs_before:]
        if runs and runs[0].get("waited") is not None:
            overheads.append(runs[0]["waited"])
        log("  upload %2d published after %.2f s (its message waited %s s in the daemon)"
            % (index + 1, latencies[-1], "%.3f" % overheads[-1] if runs else "?"))
        # Let the run end (its last task and ansible-runner's clean-up) before the next upload: one run per event.
        while len(daemon.runs(fqrn, event="run_succeeded")) < runs_before + 1 and time.monotonic() - started < 120:
            time.sleep(0.02)
    return latencies, overheads


def measure_burst(stack, s3, daemon, fqrn, bucket, count):
    objects = {"cvmfs/burst/d%02d/f%05d" % (i % 50, i): b"%d\n" % i for i in range(count)}
    runs_before = len(daemon.runs(fqrn))
    started = time.monotonic()
    e2e.upload_many(s3, bucket, objects, workers=32)
    uploaded = time.monotonic() - started
    log("  %d objects uploaded in %.1f s" % (count, uploaded))
    expected_paths = {key[len(e2e.PREFIX):] for key in objects}
    while not expected_paths <= set(e2e.published_files(stack, fqrn)):
        if time.monotonic() - started > 1800:
            raise RuntimeError("the burst was never fully published")
        time.sleep(0.2)
    total = time.monotonic() - started
    runs = len(daemon.runs(fqrn)) - runs_before
    return objects, uploaded, total, runs


def measure_full_sync(stack, s3, objects, short):
    """A fresh repository holding the same objects, published by one `full` run of sync_repository.yml."""
    fqrn = short + ".infn.it"
    e2e.seed_keys(stack, fqrn, "sub-" + short)
    s3.create_bucket(Bucket=short)
    proc = run_playbook("provision_repository.yml", {"cvmfs_repository": fqrn, "cvmfs_subject": "sub-" + short})
    if proc.returncode != 0:
        raise RuntimeError("provisioning %s failed:\n%s" % (fqrn, proc.stdout[-2000:]))
    e2e.upload_many(s3, short, objects, workers=32)
    started = time.monotonic()
    proc = run_playbook("sync_repository.yml", {"cvmfs_repository": fqrn, "cvmfs_sync_mode": "full"})
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError("full sync of %s failed:\n%s" % (fqrn, proc.stdout[-2000:]))
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=20)
    parser.add_argument("--burst", type=int, default=2000)
    args = parser.parse_args()
    stack, started_here = bench_sync.ensure_stack()
    s3 = bench_sync.s3_client(stack)
    tag = "b" + secrets.token_hex(3)
    results = {"uploads": args.uploads, "burst_objects": args.burst}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-consumer-") as folder:
            daemon = e2e.DaemonProcess(stack, Path(folder), "daemon", "publisher-" + tag, tag + ".dlq",
                                       ["%s*.infn.it" % tag])
            daemon.start()
            try:
                log("provisioning %s.infn.it through the daemon" % tag)
                fqrn = e2e.provision(stack, s3, daemon, tag)
                if args.uploads:
                    log("latency of a 1 KiB upload, %d times:" % args.uploads)
                    latencies, overheads = measure_latency(stack, s3, daemon, fqrn, tag, args.uploads)
                    results.update(latency_summary(latencies),
                                   daemon_overhead_p50_s=round(statistics.median(overheads), 3) if overheads else None,
                                   load_average_latency=round(os.getloadavg()[0], 2))
                    p50 = results["latency_p50_s"]
                    overhead = results["daemon_overhead_p50_s"]
                    log("latency: p50 %.2f s (goal <= 1.0 s: %s), p95 %.2f s; message in -> run started p50 %s s "
                        "(daemon overhead, goal <= 0.1 s: %s); load average %.2f"
                        % (p50, met(p50 <= 1.0), results["latency_p95_s"], overhead,
                           met(overhead is not None and overhead <= 0.1), results["load_average_latency"]))
                log("burst of %d objects:" % args.burst)
                objects, uploaded, total, runs = measure_burst(stack, s3, daemon, fqrn, tag, args.burst)
                results.update(burst_upload_s=round(uploaded, 1), burst_published_s=round(total, 1),
                               burst_after_last_upload_s=round(total - uploaded, 1), burst_sync_runs=runs,
                               load_average_burst=round(os.getloadavg()[0], 2))
                log("burst: all published %.1f s after the first upload, %.1f s after the last (goal <= 3 s: %s), in "
                    "%d sync run(s) (goal <= 10: %s); load average %.2f"
                    % (total, total - uploaded, met(total - uploaded <= 3), runs, met(runs <= 10),
                       results["load_average_burst"]))
            finally:
                daemon.stop()
        log("full sync of the same %d objects into a fresh repository (ansible-playbook):" % args.burst)
        full = measure_full_sync(stack, s3, objects, tag + "f")
        goal = 1.3 * full + 5
        results.update(full_sync_s=round(full, 1), burst_goal_s=round(goal, 1),
                       burst_within_goal=total <= goal)
        log("full sync: %.1f s; earlier burst goal, first upload to all published <= 1.3 x full + 5 s = %.1f s: %s" % (
            full, goal, "met" if total <= goal else "NOT met"))
    finally:
        if started_here:
            subprocess.run([bench_sync.STACK, "down"], check=False)
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
