#!/usr/bin/env python3
"""Re-provisioning when nothing changed: one repository, and a fleet converged in one run.

    DEVSTACK_DIR=... DEVSTACK_PORT_BASE=... .venv/bin/python bench/provision.py [--repositories 100]

1. One repository: ``provision_repository.yml`` again, ``--repeat`` times (keys, repository, queue, topic,
   notification all in place): the median seconds and ``changed``. Goal: <= 2 s, changed=0.
2. A fleet: ``--repositories`` repositories (keys in Vault, buckets) provisioned by a first run of
   ``converge_repositories.yml``, then the same run again: seconds and ``changed``. Goal for 100: <= 60 s, changed=0.
   The playbook runs each step once for all the repositories (the modules' ``batch``), on the one host.

Uses the stack in $DEVSTACK_DIR (starting one if needed). Prints each figure beside its goal with the load
average, and ends with one line of JSON. Never asserts a time.
"""
import argparse
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(0, str(REPO_ROOT / "bench"))

import sync as bench_sync  # noqa: E402  (bench/sync.py: the stack and S3 helpers)
from helpers import run_playbook  # noqa: E402

RECAP = re.compile(r"^\S+\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def log(text):
    print(text, flush=True)


def changed_total(proc):
    recaps = RECAP.findall(proc.stdout)
    if not recaps:
        raise RuntimeError("no PLAY RECAP:\n%s%s" % (proc.stdout[-3000:], proc.stderr[-2000:]))
    return sum(int(changed) for _ok, changed, _unreachable, _failed in recaps)


def timed_playbook(playbook, extra_vars):
    started = time.monotonic()
    proc = run_playbook(playbook, extra_vars)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        lines = proc.stdout.splitlines()
        failures = "\n".join("\n".join(lines[i:i + 25]) for i, line in enumerate(lines)
                             if line.startswith(("fatal:", "failed:")))
        raise RuntimeError("%s failed:\n%s\n%s%s" % (playbook, failures[:6000], proc.stdout[-1500:],
                                                     proc.stderr[-2000:]))
    return elapsed, changed_total(proc)


def prepare(env, s3, short):
    fqrn = short + ".infn.it"
    subprocess.run([bench_sync.STACK, "seed-keys", fqrn, "--subject", "sub-" + short], check=True,
                   capture_output=True)
    s3.create_bucket(Bucket=short)
    return {"repository": fqrn, "subject": "sub-" + short}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repositories", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5, help="runs of the one-repository re-provisioning")
    args = parser.parse_args()
    env, started_here = bench_sync.ensure_stack()
    s3 = bench_sync.s3_client(env)
    tag = "v" + secrets.token_hex(2)
    figures = {"repositories": args.repositories}
    try:
        one = prepare(env, s3, tag + "one")
        extra = {"cvmfs_repository": one["repository"], "cvmfs_subject": one["subject"]}
        timed_playbook("provision_repository.yml", extra)
        runs = [timed_playbook("provision_repository.yml", extra) for _ in range(args.repeat)]
        seconds, changed = statistics.median(run[0] for run in runs), sum(run[1] for run in runs)
        figures["one_repository"] = {"seconds": round(seconds, 2), "changed": changed,
                                     "runs_s": [round(run[0], 2) for run in runs],
                                     "load_average": round(os.getloadavg()[0], 2), "goal": "<= 2 s, changed=0"}
        log("one repository, nothing to change: %.2f s (median of %d runs: %s), changed=%d in all (goal <= 2 s, "
            "changed=0: %s); load average %.2f"
            % (seconds, len(runs), ", ".join("%.2f" % run[0] for run in runs), changed,
               "met" if seconds <= 2 and changed == 0 else "NOT met", os.getloadavg()[0]))

        with ThreadPoolExecutor(8) as pool:
            fleet = list(pool.map(lambda i: prepare(env, s3, "%sf%03d" % (tag, i)), range(args.repositories)))
        first, first_changed = timed_playbook("converge_repositories.yml", {"cvmfs_repositories": fleet})
        log("fleet of %d: first converge (creates everything) %.1f s, changed=%d"
            % (args.repositories, first, first_changed))
        seconds, changed = timed_playbook("converge_repositories.yml", {"cvmfs_repositories": fleet})
        goal = 60.0 * args.repositories / 100
        figures["fleet"] = {"first_s": round(first, 1), "again_s": round(seconds, 1), "again_changed": changed,
                            "per_repository_s": round(seconds / args.repositories, 3),
                            "load_average": round(os.getloadavg()[0], 2),
                            "goal": "100 repositories <= 60 s (scaled: %.0f s), changed=0" % goal}
        log("fleet of %d, nothing to change: %.1f s (%.2f s per repository), changed=%d (goal %.0f s for %d, "
            "changed=0: %s); load average %.2f"
            % (args.repositories, seconds, seconds / args.repositories, changed, goal, args.repositories,
               "met" if seconds <= goal and changed == 0 else "NOT met", os.getloadavg()[0]))
    finally:
        if started_here:
            subprocess.run([bench_sync.STACK, "down"], check=False, stdout=subprocess.DEVNULL)
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
