#!/usr/bin/env python3
"""Where the time of one event goes: a table of the parts of one consumer run (one new 1 KiB object published).

    DEVSTACK_DIR=... DEVSTACK_PORT_BASE=... .venv/bin/python bench/profile.py [--repeat 7]

Each part is measured on its own, ``--repeat`` times, and reported as the median wall time and the median CPU time
(user + system of the processes it started). The machine may be shared: CPU time moves much less with the load
than wall time, so both are printed, with the load average. The parts (each row says what it adds):

- python start-up; ansible-playbook's imports; ansible-playbook with no task (configuration, inventory, collection
  loader, callbacks); one more task (a ``debug``: worker fork, templating, callback events);
- the module's payload (AnsiballZ): built from scratch (what every ansible-playbook process paid before the payload
  cache of ``plugins/plugin_utils/_ansiballz_cache.py``) and read from that cache;
- the module's imports (ansible.module_utils.basic, the collection's module_utils with botocore);
- the sync engine in a child process, changes mode, one new key: its ``durations`` say the HeadObject (``plan``),
  the GetObject (``download``) and the ``cvmfs_server`` transaction and publish (``transaction``); one call of the
  ``cvmfs_server`` stand-in alone (a Python process: the real tool is a shell script);
- ``playbooks/sync_repository.yml`` by ansible-playbook (pipelining on, and off for comparison);
- the same through the consumer's ``PlaybookRunner`` (ansible-runner and the guard), as the daemon runs it.

The daemon's own overhead (message in -> run started, run ended -> acked) is measured by bench/consumer.py
(from the PUT to the daemon's run_started). Ends with one line of JSON. Never asserts a time.
"""
import argparse
import json
import os
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO_ROOT / "consumer" / "src"))
sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(0, str(REPO_ROOT / "bench"))

import sync as bench_sync  # noqa: E402  (bench/sync.py: the stack and S3 helpers, as bench/provision.py does)

GOAL_EVENT_S = 1.0   # one event -> published, p50 (bench/consumer.py measures it end to end)


def log(text):
    print(text, flush=True)


def load_average():
    return round(os.getloadavg()[0], 2)


def measure(action, repeat):
    """(median wall s, median CPU s) of ``action()``, run ``repeat`` times; CPU of this process (ansible-runner runs
    in it) and of the processes it waited for."""
    def cpu():
        return sum(usage.ru_utime + usage.ru_stime for usage in (resource.getrusage(resource.RUSAGE_CHILDREN),
                                                                 resource.getrusage(resource.RUSAGE_SELF)))
    walls, cpus = [], []
    for _ in range(repeat):
        before = cpu()
        started = time.monotonic()
        action()
        walls.append(time.monotonic() - started)
        cpus.append(cpu() - before)
    return statistics.median(walls), statistics.median(cpus)


def run(argv, env=None, cwd=REPO_ROOT):
    proc = subprocess.run(argv, cwd=str(cwd), env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError("%s failed:\n%s%s" % (" ".join(map(str, argv)), proc.stdout[-2000:], proc.stderr[-2000:]))
    return proc


def ansible_env(**extra):
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO_ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               PATH="%s:%s" % (VENV_BIN, os.environ.get("PATH", "")))
    env.update(extra)
    return env


PLAY = """- hosts: localhost
  gather_facts: false
  tasks: %s
"""

PAYLOAD_SCRIPT = r"""
import os, shutil, sys, time
from ansible import constants as C
from ansible.executor import module_common
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar
from ansible.utils.collection_loader._collection_finder import _AnsibleCollectionFinder
_AnsibleCollectionFinder(paths=[sys.argv[1]])._install()
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.plugin_utils import _ansiballz_cache
def build():
    module_common.modify_module(module_name="cvmfs_sync", module_path=sys.argv[2], module_args={},
                                templar=Templar(loader=DataLoader()),
                                task_vars={"ansible_python_interpreter": sys.executable})
cache = os.path.join(C.DEFAULT_LOCAL_TMP, "ansiballz_cache")
started = time.monotonic(); build(); cold = time.monotonic() - started
shutil.rmtree(cache)
_ansiballz_cache.share(); build()  # fills the lasting cache if this collection's payload is not there yet
os.remove(cache)  # the link: as the next ansible-playbook process finds its own new folder
started = time.monotonic(); _ansiballz_cache.share(); build(); warm = time.monotonic() - started
print("%.4f %.4f" % (cold, warm))
"""


def payload_build(repeat):
    """(cold, warm) seconds to make the cvmfs_sync payload, medians; in-process, after ansible's imports."""
    colds, warms = [], []
    for _ in range(repeat):
        out = run([sys.executable, "-c", PAYLOAD_SCRIPT, str(REPO_ROOT / ".build" / "collections"),
                   str(REPO_ROOT / "plugins" / "modules" / "cvmfs_sync.py")],
                  env=ansible_env()).stdout.split()
        colds.append(float(out[0]))
        warms.append(float(out[1]))
    return statistics.median(colds), statistics.median(warms)


MODULE_IMPORTS = ("import ansible.module_utils.basic; "
                  "from ansible_collections.infn_cloud.cvmfs_publisher.plugins.modules import cvmfs_sync")


class Setup:
    """A stand-in repository whose bucket gets one new 1 KiB object before each run."""

    def __init__(self, env, workdir):
        self.env = env
        self.s3 = bench_sync.s3_client(env)
        self.short = "p" + secrets.token_hex(3)
        self.s3.create_bucket(Bucket=self.short)
        self.repo = bench_sync.Repository(env, self.short, workdir)
        self.count = 0
        self.vars_file = run([bench_sync.STACK, "vars"]).stdout.strip()
        self.upload()
        bench_sync.timed_engine(self.repo.params(4))  # first publish: the state exists from now on

    def upload(self):
        self.count += 1
        key = "%sevent/f%04d" % (bench_sync.PREFIX, self.count)
        self.s3.put_object(Bucket=self.short, Key=key, Body=secrets.token_bytes(1024))
        return key

    def extravars(self, key):
        return {"cvmfs_repository": self.repo.fqrn, "cvmfs_sync_mode": "changes", "cvmfs_sync_keys": [key],
                "cvmfs_sync_state_dir": self.repo.state_dir}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    env, started_here = bench_sync.ensure_stack()
    workdir = tempfile.mkdtemp(prefix="bench-profile-")
    rows, figures = [], {"repeat": args.repeat, "load_average_start": load_average()}

    def row(name, wall, cpu, note=""):
        rows.append((name, wall, cpu, note))
        figures[name.strip()] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3) if cpu is not None else None}
        log("  %-44s %6.3f s wall %s %s" % (name, wall, "" if cpu is None else "%6.3f s cpu" % cpu, note))

    try:
        setup = Setup(env, workdir)
        plays = Path(workdir)
        (plays / "none.yml").write_text(PLAY % "[]")
        (plays / "one.yml").write_text(PLAY % "[{ansible.builtin.debug: {msg: x}}]")
        python = measure(lambda: run([sys.executable, "-c", "pass"]), args.repeat)
        row("python start-up", *python)
        imports = measure(lambda: run([sys.executable, "-c", "import ansible.cli.playbook"]), args.repeat)
        row("ansible-playbook imports", imports[0] - python[0], imports[1] - python[1])
        empty = measure(lambda: run([str(VENV_BIN / "ansible-playbook"), str(plays / "none.yml")],
                                    env=ansible_env()), args.repeat)
        row("ansible-playbook start-up (no task)", empty[0] - imports[0], empty[1] - imports[1],
            "config, inventory, collections, callbacks")
        one = measure(lambda: run([str(VENV_BIN / "ansible-playbook"), str(plays / "one.yml")],
                                  env=ansible_env()), args.repeat)
        row("one more task (debug)", one[0] - empty[0], one[1] - empty[1], "fork, templating, events")
        cold, warm = payload_build(args.repeat)
        row("module payload built (no cache)", cold, None, "what each run paid before")
        row("module payload from the lasting cache", warm, None, "what each run pays now")
        module_imports = measure(lambda: run([sys.executable, "-c", MODULE_IMPORTS], env=dict(
            os.environ, PYTHONPATH=str(REPO_ROOT / ".build" / "collections"))), args.repeat)
        row("module imports (basic + collection)", module_imports[0] - python[0], module_imports[1] - python[1])
        durations = []

        def engine():
            params = setup.repo.params(4, mode="changes", keys=[setup.upload()])
            durations.append(bench_sync.timed_engine(params)[1]["durations"])
        engine_run = measure(engine, args.repeat)
        row("sync engine, child process (all of it)", *engine_run)
        for part, what in (("plan", "S3 HeadObject"), ("download", "S3 GetObject"),
                           ("transaction", "cvmfs_server transaction+publish")):
            row("  of which %s" % what, statistics.median(d.get(part, 0.0) for d in durations), None)
        server = measure(lambda: run([env["CVMFS_SERVER_BIN"], "list"]), args.repeat)
        row("  one cvmfs_server stand-in call", *server, "a Python process; the real one is shell")

        def playbook(**extra):
            def action():
                key = setup.upload()
                run([str(VENV_BIN / "ansible-playbook"), str(REPO_ROOT / "playbooks" / "sync_repository.yml"),
                     "-e", "@" + setup.vars_file, "-e", json.dumps(setup.extravars(key))], env=ansible_env(**extra))
            return action
        direct = measure(playbook(), args.repeat)
        row("sync_repository.yml by ansible-playbook", *direct, "<- one event's run")
        piped = measure(playbook(ANSIBLE_PIPELINING="True"), args.repeat)
        row("  the same with pipelining", *piped, "the module through python's stdin")

        from cvmfs_publisher_consumer.runner import PlaybookRunner
        runner = PlaybookRunner({
            "project_dir": str(REPO_ROOT), "sync_playbook": "playbooks/sync_repository.yml",
            "extravars_files": [setup.vars_file], "inventory": "", "playbook_bin": str(VENV_BIN / "ansible-playbook"),
            "env": {"ANSIBLE_CONFIG": str(REPO_ROOT / "ansible.cfg")}, "timeout": 600, "keep_failed_runs": 0,
            "verbosity": 0}, str(Path(workdir) / "runner-state"))

        def through_runner():
            result = runner.run("sync_playbook", setup.extravars(setup.upload()), "profile")
            if not result.ok:
                raise RuntimeError("runner run failed: %s" % result.error)
        runner_run = measure(through_runner, args.repeat)
        row("the same through ansible-runner + guard", *runner_run, "as the daemon runs it")
        row("  ansible-runner + guard overhead", runner_run[0] - direct[0], runner_run[1] - direct[1])
        figures["load_average_end"] = load_average()
        met = runner_run[0] <= GOAL_EVENT_S
        figures["run_through_runner_within_event_goal"] = met
        log("one run through ansible-runner: %.2f s wall (%.2f s CPU); goal for a whole event (p50, "
            "bench/consumer.py) <= %.1f s: %s on this run; load average %.2f -> %.2f"
            % (runner_run[0], runner_run[1], GOAL_EVENT_S, "within" if met else "NOT within",
               figures["load_average_start"], figures["load_average_end"]))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if started_here:
            subprocess.run([bench_sync.STACK, "down"], check=False, stdout=subprocess.DEVNULL)
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
