#!/usr/bin/env python3
"""Benchmark of the sync engine (cvmfs_sync) against rclone and the AWS CLI on the same RGW bucket.

    DEVSTACK_DIR=... DEVSTACK_PORT_BASE=... .venv/bin/python bench/sync.py [--small] [--concurrency 16]

Uses the stack in $DEVSTACK_DIR when it is up, else starts one there and stops it at the end. Prints figures as
it goes and ends with one line of JSON holding all of them. Never asserts a time: goals are reported, not enforced.

Our runs call the engine (plugins/module_utils/_sync.py) in a child Python process, so its start-up and imports
count like rclone's and the AWS CLI's, and its peak RSS can be read; ansible's own start-up (a few seconds per
task) is not included. The AWS CLI is `$AWS_CLI`, else `aws` on PATH; without it that comparison is skipped.
"""

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / ".build" / "collections"))
STACK = str(REPO_ROOT / "devstack" / "stack")
PREFIX = "cvmfs/"


def log(text):
    print(text, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The stack, buckets and repositories


def stack_env():
    proc = subprocess.run([STACK, "env", "--json"], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def ensure_stack():
    """(env, started_here)"""
    if subprocess.run([STACK, "status"], capture_output=True).returncode == 0:
        return stack_env(), False
    log("starting a local stack in %s" % os.environ.get("DEVSTACK_DIR", "(default)"))
    subprocess.run([STACK, "up"], check=True, stdout=subprocess.DEVNULL)
    return stack_env(), True


def s3_client(env, pool=64):
    import boto3
    import botocore.config
    return boto3.client(
        "s3", endpoint_url=env["RGW_ENDPOINT"], region_name=env["RGW_REGION"],
        aws_access_key_id=Path(env["RGW_ACCESS_KEY_FILE"]).read_text().strip(),
        aws_secret_access_key=Path(env["RGW_SECRET_KEY_FILE"]).read_text().strip(),
        config=botocore.config.Config(max_pool_connections=pool, request_checksum_calculation="when_required",
                                      response_checksum_validation="when_required",
                                      retries={"mode": "standard", "max_attempts": 5}))


def fill_bucket(s3, bucket, count, size, name="obj", salt=b""):
    """count objects of size bytes under cvmfs/, spread over 100 folders; returns their keys."""
    keys = ["%sd%02d/%s-%06d" % (PREFIX, i % 100, name, i) for i in range(count)]

    def put(key):
        body = (hashlib.sha256(key.encode() + salt).digest() * (size // 32 + 1))[:size]
        s3.put_object(Bucket=bucket, Key=key, Body=body)

    with ThreadPoolExecutor(64) as pool:
        list(pool.map(put, keys))
    return keys


class Repository:
    """A stand-in repository for a bucket, with its own state and staging folders."""

    def __init__(self, env, short, workdir, name=None):
        name = name or short
        self.env, self.short, self.fqrn = env, short, "%s.bench.org" % name
        keys = Path(workdir) / ("keys-" + name)
        keys.mkdir(parents=True)
        for suffix in ("crt", "pub", "gw"):
            (keys / ("%s.%s" % (self.fqrn, suffix))).write_text("stand-in key\n")
        subprocess.run([env["CVMFS_SERVER_BIN"], "mkfs", "-w", "%s/%s" % (env["CVMFS_STRATUM0_URL"], self.fqrn),
                        "-u", "gw,/tmp/txn,%s" % env["CVMFS_GATEWAY_URL"], "-k", str(keys), "-o", "root",
                        self.fqrn], check=True, stdout=subprocess.DEVNULL)
        self.state_dir = str(Path(workdir) / ("state-" + name))

    def params(self, concurrency, **extra):
        params = dict(repository=self.fqrn, bucket=self.short, prefix=PREFIX, mode="full", keys=[],
                      tarballs=True, concurrency=concurrency, state_dir=self.state_dir, staging_dir=None,
                      abort_stale_transaction=True, transaction_retries=5, max_reported_paths=10,
                      endpoint_url=self.env["RGW_ENDPOINT"], region=self.env["RGW_REGION"],
                      access_key_file=self.env["RGW_ACCESS_KEY_FILE"],
                      secret_key_file=self.env["RGW_SECRET_KEY_FILE"],
                      cvmfs_server_bin=self.env["CVMFS_SERVER_BIN"], cvmfs_root=self.env["CVMFS_STANDIN_ROOT"])
        params.update(extra)
        return params

    def sync(self, concurrency, **extra):
        """Run the engine in a child process: (seconds, result, peak RSS in MB)."""
        return timed_engine(self.params(concurrency, **extra))


def timed_engine(params):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, __file__, "--engine-run", json.dumps(params)], capture_output=True,
                          text=True)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError("engine run failed:\n%s%s" % (proc.stdout[-3000:], proc.stderr[-3000:]))
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["result"]["bench_cpu_s"] = out["cpu_s"]  # the child's own CPU time (user + system), beside its wall time
    return elapsed, out["result"], out["max_rss_mb"]


def engine_run(params_json):
    """Child process: one sync; prints {"result", "max_rss_mb"}."""
    from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _sync
    result = _sync.run(json.loads(params_json))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"result": result, "max_rss_mb": round(peak_rss_kb() / 1024.0, 1),
                      "cpu_s": round(usage.ru_utime + usage.ru_stime, 2)}))


def peak_rss_kb():
    """This process's peak RSS. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec, so a child
    would report its (bigger) parent's peak."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ---------------------------------------------------------------------------------------------------------------
# The other tools


def rclone_env(env):
    # rclone's AWS SDK cannot use AWS_CA_BUNDLE with its own HTTP transport ("LoadCustomCABundleError").
    out = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    out.update({
        "RCLONE_CONFIG_BENCH_TYPE": "s3", "RCLONE_CONFIG_BENCH_PROVIDER": "Ceph",
        "RCLONE_CONFIG_BENCH_ENDPOINT": env["RGW_ENDPOINT"], "RCLONE_CONFIG_BENCH_REGION": env["RGW_REGION"],
        "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": Path(env["RGW_ACCESS_KEY_FILE"]).read_text().strip(),
        "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": Path(env["RGW_SECRET_KEY_FILE"]).read_text().strip(),
        "RCLONE_CONFIG": "/dev/null",
    })
    return out


def _timed_rclone(env, *args):
    """Seconds one ``rclone`` command takes against the stack."""
    start = time.monotonic()
    subprocess.run(["rclone", *args], env=rclone_env(env), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)
    return time.monotonic() - start


def rclone(env, command, bucket, dest, concurrency, *flags):
    return _timed_rclone(env, command, "bench:%s/%s" % (bucket, PREFIX), dest, "--transfers", str(concurrency),
                         "--checkers", str(concurrency), *flags)


def rclone_listing(env, bucket, concurrency, *flags):
    """Seconds for rclone to list every object under the prefix (nothing compared, nothing copied)."""
    return _timed_rclone(env, "lsf", "-R", "--files-only", "bench:%s/%s" % (bucket, PREFIX), "--checkers",
                         str(concurrency), *flags)


def aws_cli():
    return os.environ.get("AWS_CLI") or shutil.which("aws")


def aws_sync(env, bucket, dest, concurrency, workdir):
    config = Path(workdir) / "aws-config"
    config.write_text("[default]\nregion = %s\ns3 =\n  max_concurrent_requests = %d\n" % (env["RGW_REGION"],
                                                                                       concurrency))
    cli_env = dict(os.environ, AWS_CONFIG_FILE=str(config), AWS_SHARED_CREDENTIALS_FILE="/dev/null",
                   AWS_ACCESS_KEY_ID=Path(env["RGW_ACCESS_KEY_FILE"]).read_text().strip(),
                   AWS_SECRET_ACCESS_KEY=Path(env["RGW_SECRET_KEY_FILE"]).read_text().strip())
    start = time.monotonic()
    subprocess.run([aws_cli(), "s3", "sync", "--only-show-errors", "--endpoint-url", env["RGW_ENDPOINT"],
                    "s3://%s/%s" % (bucket, PREFIX), dest], env=cli_env, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - start


# ---------------------------------------------------------------------------------------------------------------
# Scenarios


def full_copy(env, s3, workdir, short, count, size, concurrency, figures, label, into=None, rounds=3):
    """A first sync of a full bucket against ``rclone copy`` (and once ``aws s3 sync``) of it, in ``rounds``
    interleaved rounds, each into a new repository and new folders; each figure is the median of its rounds (this
    machine's cost of creating a file moves 2-3x within minutes). ``into``: a folder for our staging and their
    destinations (default: our staging under the stand-in's root, theirs in ``workdir``). Returns the first
    round's repository."""
    s3.create_bucket(Bucket=short)
    start = time.monotonic()
    fill_bucket(s3, short, count, size)
    log("[%s] uploaded %d x %d bytes in %.1f s" % (label, count, size, time.monotonic() - start))
    quiet = wait_for_quiet()  # the uploads load RGW for a while after the last PUT: not on whoever runs first
    runs = {"ours": [], "ours_without_transaction": [], "rclone": []}
    repos = []
    for number in range(rounds):
        repo = Repository(env, short, workdir, name="%s-r%d" % (short, number))
        repos.append(repo)
        extra = {"staging_dir": tempfile.mkdtemp(dir=into)} if into else {}
        ours, result, rss = repo.sync(concurrency, **extra)
        assert result["added"] == count, result  # a correctness check, not a timing one
        runs["ours"].append(ours)
        # Without the transaction phase (the stand-in's publish hashes and stores every file): what rclone does.
        runs["ours_without_transaction"].append(ours - result["durations"]["transaction"])
        runs["rclone"].append(rclone(env, "copy", short, tempfile.mkdtemp(dir=into or workdir), concurrency))
    ours, without, rclone_s = (statistics.median(runs[name]) for name in ("ours", "ours_without_transaction",
                                                                           "rclone"))
    row = {"ours_s": round(ours, 2), "waited_for_quiet_s": quiet, "ours_plan_s": result["durations"]["plan"],
           "ours_download_s": result["durations"]["download"],
           "ours_transaction_s": result["durations"]["transaction"], "ours_rss_mb": rss, "into": into or "disk",
           "rounds": rounds, "runs_s": {name: [round(value, 2) for value in values] for name, values in runs.items()},
           "rclone_copy_s": round(rclone_s, 2), "ratio_vs_rclone": round(ours / rclone_s, 2),
           "ratio_without_transaction_vs_rclone": round(without / rclone_s, 2),
           "load_average": round(os.getloadavg()[0], 2)}
    if aws_cli():
        row["aws_s3_sync_s"] = round(aws_sync(env, short, tempfile.mkdtemp(dir=into or workdir), concurrency,
                                              workdir), 2)
        row["ratio_vs_aws"] = round(ours / row["aws_s3_sync_s"], 2)
    log("[%s] medians of %d interleaved rounds: ours %.2f s (last round: list+plan %.2f, download %.2f, transaction "
        "%.2f), rclone copy %.2f s, aws s3 sync %s s (once) -> %.2fx rclone, %.2fx without the transaction (goal <= "
        "1.0: %s); rounds without the transaction %s, rclone %s; load average %.2f%s"
        % (label, rounds, ours, row["ours_plan_s"], row["ours_download_s"], row["ours_transaction_s"],
           row["rclone_copy_s"], row.get("aws_s3_sync_s", "n/a"), row["ratio_vs_rclone"],
           row["ratio_without_transaction_vs_rclone"],
           "met" if row["ratio_without_transaction_vs_rclone"] <= 1.0 else "NOT met",
           row["runs_s"]["ours_without_transaction"], row["runs_s"]["rclone"], row["load_average"],
           ", staging and destinations in %s" % into if into else ""))
    figures[label] = row
    return repos[0]


def no_change(env, repo, workdir, concurrency, figures, rounds=5):
    """A full reconcile that finds nothing to do, against rclone's no-change sync of a mirror of the same bucket
    (``--size-only``, and ``--size-only --fast-list``: one listing, no per-object check, what our state file gives
    us too). ``rounds`` interleaved rounds of the three, each figure their median: this machine's speed moves within
    minutes, and whoever runs alone in a slow minute would lose."""
    mirror = tempfile.mkdtemp(dir=workdir)
    rclone(env, "copy", repo.short, mirror, concurrency)
    wait_for_quiet()  # the full copies just before leave the load at 5 to 9: not on whoever runs first
    default = rclone(env, "sync", repo.short, mirror, concurrency)
    runs = {"ours": [], "size_only": [], "fast": []}
    for _ in range(rounds):
        seconds, result, _ = repo.sync(concurrency)
        assert not result["changed"], result
        runs["ours"].append(seconds)
        runs["size_only"].append(rclone(env, "sync", repo.short, mirror, concurrency, "--size-only"))
        runs["fast"].append(rclone(env, "sync", repo.short, mirror, concurrency, "--size-only", "--fast-list"))
    ours, size_only, fast = (statistics.median(runs[name]) for name in ("ours", "size_only", "fast"))
    row = {"ours_s": round(ours, 2), "ours_plan_s": result["durations"]["plan"],
           "rclone_sync_default_s": round(default, 2), "rclone_sync_size_only_s": round(size_only, 2),
           "rclone_sync_size_only_fast_list_s": round(fast, 2), "rounds": rounds,
           "runs_s": {name: [round(value, 2) for value in values] for name, values in runs.items()},
           "ratio_vs_size_only": round(ours / size_only, 2),
           "ratio_vs_size_only_fast_list": round(ours / fast, 2), "load_average": round(os.getloadavg()[0], 2),
           "goal": "ratio_vs_size_only <= 1.0"}
    log("[no-change %d] medians of %d interleaved rounds: ours %.2f s (list+plan %.2f), rclone sync %.2f s (once), "
        "--size-only %.2f s, --size-only --fast-list %.2f s -> %.2fx --size-only (goal <= 1.0: %s), %.2fx "
        "--fast-list; load average %.2f"
        % (result["unchanged"], rounds, ours, row["ours_plan_s"], default, size_only, fast,
           row["ratio_vs_size_only"], "met" if ours <= size_only else "NOT met", row["ratio_vs_size_only_fast_list"],
           row["load_average"]))
    figures["no_change_full_%d" % result["unchanged"]] = row


def change_some(s3, bucket, keys, salt):
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda key: s3.put_object(Bucket=bucket, Key=key, Body=salt + key.encode()), keys))


def one_percent(env, s3, repo, keys, concurrency, figures):
    changed = keys[::100]
    change_some(s3, repo.short, changed, b"one percent ")
    ours, result, _ = repo.sync(concurrency)
    row = {"ours_s": round(ours, 2), "changed_objects": len(changed),
           "objects_downloaded": result["objects_downloaded"], "updated": result["updated"],
           "exactly_the_changed_ones": result["objects_downloaded"] == len(changed) == result["updated"]}
    log("[1%% changed of %d] ours %.2f s, downloaded %d objects for %d changed"
        % (len(keys), ours, result["objects_downloaded"], len(changed)))
    figures["one_percent_full"] = row


def changes_mode(env, s3, repo, keys, concurrency, label, figures):
    touched = keys[5::len(keys) // 10][:10]
    change_some(s3, repo.short, touched, b"changes mode ")
    ours, result, _ = repo.sync(concurrency, mode="changes", keys=touched)
    assert result["mode"] == "changes" and result["updated"] == len(touched), result
    figures[label] = {"ours_s": round(ours, 2), "plan_s": result["durations"]["plan"],
                      "transaction_s": result["durations"]["transaction"], "touched": len(touched)}
    log("[%s] ours %.2f s (plan %.3f, transaction %.3f)" % (label, ours, result["durations"]["plan"],
                                                            result["durations"]["transaction"]))


def rss_listing(env, s3, workdir, short, count, concurrency, figures):
    """Peak RSS of a full reconcile of `count` objects whose state says they are all published (so the run
    lists, compares and finds nothing to do, as a periodic full reconcile does)."""
    from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _sync_plan as sp
    s3.create_bucket(Bucket=short)
    start = time.monotonic()
    keys = fill_bucket(s3, short, count, 0, name="empty")
    log("[rss] uploaded %d empty objects in %.1f s" % (count, time.monotonic() - start))
    repo = Repository(env, short, workdir)
    empty_md5 = hashlib.md5(b"").hexdigest()
    state = {key: (empty_md5, 0, sp.FILE) for key in keys}
    os.makedirs(repo.state_dir)
    identity = sp.state_identity(repo.fqrn, short, PREFIX, True)
    Path(repo.state_dir, repo.fqrn + ".json").write_text(sp.dump_state(state, identity))
    del state, keys
    quiet = wait_for_quiet()  # the uploads just before load the machine (load average 17 after 100,000 PUTs)
    runs = []
    for _ in range(3):
        ours, result, rss = repo.sync(concurrency)
        assert result["unchanged"] == count and not result["changed"], result
        runs.append((ours, result, rss))
    ours, result, _ = sorted(runs, key=lambda run: run[0])[1]  # the median run
    rss = max(run[2] for run in runs)
    cpu = result["bench_cpu_s"]
    listing = min(rclone_listing(env, short, concurrency, *flags) for flags in ((), ("--fast-list",)))
    figures["rss_full_reconcile"] = {"objects": count, "peak_rss_mb": rss, "seconds": round(ours, 2),
                                     "rclone_listing_s": round(listing, 2), "ratio_vs_rclone_listing": round(
                                         ours / listing, 2),
                                     "runs_s": [round(run[0], 2) for run in runs], "waited_for_quiet_s": quiet,
                                     "plan_s": result["durations"]["plan"], "cpu_s": cpu,
                                     "load_average": round(os.getloadavg()[0], 2),
                                     "goal": "seconds <= 2 and peak_rss_mb <= 200 (100,000 objects)"}
    log("[rss] full reconcile of %d objects (median of 3, after waiting %.0f s for the load to settle): peak RSS "
        "%.1f MB (goal <= 200: %s), %.2f s (goal <= 2 s: %s), in which our process used %.2f s of CPU (user + "
        "system); runs %s; rclone only listing the same objects (lsf -R, the faster of with and without "
        "--fast-list) %.2f s -> %.2fx; load average %.2f"
        % (count, quiet, rss, "met" if rss <= 200 else "NOT met", ours, "met" if ours <= 2 else "NOT met", cpu,
           figures["rss_full_reconcile"]["runs_s"], listing, ours / listing, os.getloadavg()[0]))


def wait_for_quiet(below=1.5, at_most=240):
    """Seconds waited (up to ``at_most``) for the 1-minute load average to drop below ``below``: a figure taken
    right after the bench's own uploads measures them, not the sync."""
    start = time.monotonic()
    while os.getloadavg()[0] >= below and time.monotonic() - start < at_most:
        time.sleep(5)
    return round(time.monotonic() - start, 1)


def hostile_tarball(index):
    """A tarball whose link chain leaves its folder only when resolved (b -> ., then c -> b/b/../../x)."""
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        for name, target in (("b", "."), ("c", "b/" * 4 + "../" * 4 + "etc/passwd-%d" % index)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    return buf.getvalue()


def refusals(env, s3, workdir, run_id, count, hostile, concurrency, figures, rounds=3):
    """Two buckets of the same `count` objects, one with `hostile` refused objects besides (half escaping tarballs,
    half refused keys). The first full sync of each, then `rounds` times: 1% changed in both and a full sync of
    each, in alternating order (the machine's load changes; medians are reported). By the second sync the
    refusals are remembered, so the refused objects are not downloaded or judged again."""
    import statistics
    repos, keys, first = {}, {}, {}
    for label, extra in (("clean", 0), ("with_refused", hostile)):
        short = "b%s-%s" % (run_id, label.replace("_", "-"))
        s3.create_bucket(Bucket=short)
        keys[label] = fill_bucket(s3, short, count, 4096)
        for i in range(extra // 2):
            s3.put_object(Bucket=short, Key="%sbad/t%04d.tgz" % (PREFIX, i), Body=hostile_tarball(i))
            s3.put_object(Bucket=short, Key="%sbad/.wh.k%04d" % (PREFIX, i), Body=b"whiteout")
        repos[label] = Repository(env, short, workdir)
        first[label], result, _ = repos[label].sync(concurrency)
        assert result["added"] == count and result["refused"] == extra, result  # correctness, not timing
    later = {"clean": [], "with_refused": []}
    for index in range(rounds):
        order = ("clean", "with_refused") if index % 2 == 0 else ("with_refused", "clean")
        for label in order:
            changed = keys[label][index::100]
            change_some(s3, repos[label].short, changed, b"round %d " % index)
            seconds, result, _ = repos[label].sync(concurrency)
            assert result["updated"] == len(changed) == result["objects_downloaded"], result
            assert result["refused"] == (hostile if label == "with_refused" else 0), result
            later[label].append(seconds)
    clean, refused = statistics.median(later["clean"]), statistics.median(later["with_refused"])
    row = {"objects": count, "refused_objects": hostile, "rounds": rounds,
           "first_full_clean_s": round(first["clean"], 2), "first_full_with_refused_s": round(first["with_refused"], 2),
           "first_ratio": round(first["with_refused"] / first["clean"], 2),
           "later_full_clean_s": [round(t, 2) for t in later["clean"]],
           "later_full_with_refused_s": [round(t, 2) for t in later["with_refused"]],
           "later_ratio_of_medians": round(refused / clean, 2),
           "goal": "later_ratio_of_medians <= 1.10: with its refusals remembered, a bucket with refused objects "
                   "syncs as fast as one without"}
    log("[refusals: %d objects, + %d refused] first full sync %.2f s vs %.2f s clean (x%.2f, judging them once); "
        "later full syncs (1%% changed), medians of %d: %.2f s vs %.2f s clean -> x%.2f (goal <= 1.10)"
        % (count, hostile, first["with_refused"], first["clean"], row["first_ratio"], rounds, refused, clean,
           row["later_ratio_of_medians"]))
    figures["refusals"] = row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-run", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--small", action="store_true", help="a tenth of every size (a quick check of the bench)")
    parser.add_argument("--rss-objects", type=int, default=100000)
    parser.add_argument("--only-refusals", action="store_true", help="only the bucket-with-refused-objects figures")
    parser.add_argument("--only-reconcile", action="store_true",
                        help="only the no-change reconciles (10,000 objects against rclone, and --rss-objects)")
    parser.add_argument("--only-copy", action="store_true", help="only the two full copies")
    parser.add_argument("--copy-into", metavar="DIR",
                        help="our staging and rclone's and the AWS CLI's destinations of the full copies in DIR "
                             "(e.g. /dev/shm: this machine's cost of creating a file moves 2-3x within minutes with "
                             "RGW's own writes to the same disk, and tmpfs compares the transfers alone)")
    args = parser.parse_args()
    if args.engine_run:
        return engine_run(args.engine_run)
    scale = 10 if args.small else 1
    env, started = ensure_stack()
    workdir = tempfile.mkdtemp(prefix="bench-sync-")
    run_id = os.urandom(3).hex()
    figures = {"concurrency": args.concurrency, "scale": "small" if args.small else "full",
               "aws_cli": aws_cli() is not None}
    try:
        s3 = s3_client(env)
        many = 10000 // scale

        def both_copies():
            """The full copies of many small and of a few large objects; the repository of the small ones."""
            repo = full_copy(env, s3, workdir, "b%s-many" % run_id, many, 4096, args.concurrency, figures,
                             "full_copy_%dx4KiB" % many, into=args.copy_into)
            full_copy(env, s3, workdir, "b%s-big" % run_id, 20, (20 << 20) // scale, args.concurrency, figures,
                      "full_copy_20x%dMiB" % (20 // scale), into=args.copy_into)
            return repo

        if args.copy_into:
            args.copy_into = tempfile.mkdtemp(dir=args.copy_into, prefix="bench-sync-")
        if args.only_reconcile:
            repo = full_copy(env, s3, workdir, "b%s-many" % run_id, many, 4096, args.concurrency, figures,
                             "full_copy_%dx4KiB" % many, into=args.copy_into)
            no_change(env, repo, workdir, args.concurrency, figures)
            rss_listing(env, s3, workdir, "b%s-rss" % run_id, args.rss_objects // scale, args.concurrency, figures)
        elif args.only_refusals:
            refusals(env, s3, workdir, run_id, many // 2, 200 // scale, args.concurrency, figures)
        elif args.only_copy:
            both_copies()
        else:
            refusals(env, s3, workdir, run_id, many // 2, 200 // scale, args.concurrency, figures)
            repo = both_copies()
            keys = ["%sd%02d/obj-%06d" % (PREFIX, i % 100, i) for i in range(many)]
            no_change(env, repo, workdir, args.concurrency, figures)
            one_percent(env, s3, repo, keys, args.concurrency, figures)
            changes_mode(env, s3, repo, keys, args.concurrency, "changes_10_keys_in_%d" % many, figures)
            small_short = "b%s-small" % run_id
            s3.create_bucket(Bucket=small_short)
            small_keys = fill_bucket(s3, small_short, many // 10, 4096)
            small = Repository(env, small_short, workdir)
            small.sync(args.concurrency)
            changes_mode(env, s3, small, small_keys, args.concurrency, "changes_10_keys_in_%d" % (many // 10), figures)
            rss_listing(env, s3, workdir, "b%s-rss" % run_id, args.rss_objects // scale, args.concurrency, figures)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if args.copy_into:
            shutil.rmtree(args.copy_into, ignore_errors=True)
        if started:
            subprocess.run([STACK, "down"], stdout=subprocess.DEVNULL)
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
