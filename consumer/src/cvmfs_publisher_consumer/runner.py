"""One ansible-runner run of a playbook per batch.

Each run gets a fresh private data dir under ``<state_dir>/runs`` that is removed afterwards; the last N failed
ones are kept for debugging, scrubbed first: ansible-runner's ``command`` artifact records the whole process
environment, so it is rewritten without it, and any secret the daemon knows is replaced by a marker.
Extravars hold only names and keys (never secrets); connection settings come from the operator's vars files
by path (``-e @file``), and those hold only paths to secret files.

The playbook runs under ``guard.py``, in a PID namespace of its own: if the daemon dies (even ``kill -9``) every
process of the run dies with it, so a restarted or another daemon never meets a leftover run of the same repository.
"""
import json
import logging
import os
import shlex
import shutil
import signal
import stat
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional

import ansible_runner

from .files import write_text_atomic
from .guard import DAEMON_PID_ENV, REPORT_ENV
from .redact import Redactor

log = logging.getLogger("cvmfs_publisher.runner")

MAX_ERROR_LENGTH = 500

# What every run gets unless the operator's ``ansible.env`` says otherwise: no pipelining (the module runs from a
# file: Python reads a script from stdin much more slowly, and the collection's payloads carry their bytecode, see
# plugins/plugin_utils/_ansiballz_cache.py; bench/profile.py measures both), and no fact gathering.
RUN_ENV_DEFAULTS = {"ANSIBLE_PIPELINING": "False", "ANSIBLE_GATHERING": "explicit"}


@dataclass
class RunResult:
    playbook: str
    outcome: str                     # "successful", "failed", "killed", "timeout", "canceled", "error"
    rc: Optional[int]
    duration: float
    error: str = ""                  # what failed, for the log and the status file (module messages are secret-free)
    kept: str = ""                   # where the failed run's files were kept, if they were
    stats: Dict = field(default_factory=dict)
    # The sync module's refusals (cvmfs_sync's ``refusals`` result): {"current": [...], "new": [...], "cleared": [...]}
    refusals: Optional[Dict] = None

    @property
    def ok(self) -> bool:
        return self.outcome == "successful"


def outcome_of(status: str, rc: Optional[int], stats: Optional[Dict]) -> str:
    """Success needs all three: runner status, exit code 0, and no failed or unreachable host."""
    if status != "successful":
        return status or "error"
    if rc not in (0, None):
        return "failed"
    stats = stats or {}
    if any(stats.get(kind) for kind in ("failures", "dark")):
        return "failed"
    return "successful"


class _EventErrors:
    """Collects the first failed task's message from the run's events, and the sync module's refusals."""

    def __init__(self):
        self.error = ""
        self.refusals = None

    def __call__(self, event) -> bool:
        if event.get("event") == "runner_on_ok":
            res = (event.get("event_data") or {}).get("res") or {}
            if isinstance(res, dict) and isinstance(res.get("refusals"), dict):
                self.refusals = res["refusals"]
        if not self.error and event.get("event") in ("runner_on_failed", "runner_on_unreachable"):
            data = event.get("event_data") or {}
            res = data.get("res") or {}
            death = module_death(res)
            # A step whose errors the playbook handles (the role's batched steps) is not the error, unless its
            # module process died: that is what the run's error must say.
            if data.get("ignore_errors") and not death:
                return True
            message = death or res.get("msg") or res.get("stderr") or "failed"
            self.error = "%s: %s" % (data.get("task") or "task", str(message).strip())[:MAX_ERROR_LENGTH]
        return True  # keep the event on disk too (only kept for failed runs, after scrubbing)


def signal_text(number: int) -> str:
    try:
        return "killed by signal %d (%s)" % (number, signal.Signals(number).name)
    except ValueError:
        return "killed by signal %d" % number


def module_death(res: Dict) -> str:
    """What to say when a module's process died before printing its result (ansible only says that the result
    could not be read): killed by a signal, or exited without a result."""
    if not str(res.get("msg", "")).startswith(("Module result deserialization failed", "MODULE FAILURE")):
        return ""
    rc = res.get("rc")
    if not isinstance(rc, int):
        return "the module process died without reporting a result"
    if rc < 0 or rc > 128:  # a signal: negative from a direct child, 128+N through the shell that ran it
        return "the module process died, %s, before reporting a result" % signal_text(-rc if rc < 0 else rc - 128)
    return "the module process died with exit code %d without reporting a result" % rc


def _default_playbook_bin() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "ansible-playbook")
    return beside if os.access(beside, os.X_OK) else (shutil.which("ansible-playbook") or "ansible-playbook")


class PlaybookRunner:
    def __init__(self, settings: Dict, state_dir: str, secrets: Iterable[str] = ()):
        """``settings`` is the ``ansible`` section of the configuration."""
        self.settings = settings
        self.runs_dir = os.path.join(state_dir, "runs")
        self.failed_dir = os.path.join(state_dir, "failed-runs")
        self._redact = Redactor(secrets)
        os.makedirs(self.runs_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.failed_dir, mode=0o700, exist_ok=True)
        self._guard = self._write_guard(state_dir)
        self._remove_leftovers()

    def _write_guard(self, state_dir) -> str:
        """The ``binary`` ansible-runner starts: this Python running guard.py in front of ansible-playbook."""
        path = os.path.join(state_dir, "ansible-playbook-guard")
        target = self.settings["playbook_bin"] or _default_playbook_bin()
        script = "#!%s\nimport sys\nfrom cvmfs_publisher_consumer.guard import main\nsys.exit(main(%r))\n" % (
            sys.executable, target)
        write_text_atomic(path, script, mode=stat.S_IRWXU)
        return path

    def _remove_leftovers(self):
        """Private data dirs of runs a killed daemon could not clean up."""
        for name in os.listdir(self.runs_dir):
            shutil.rmtree(os.path.join(self.runs_dir, name), ignore_errors=True)

    def run(self, playbook_key: str, extravars: Dict, label: str,
            cancel: Callable[[], bool] = lambda: False) -> RunResult:
        """Run the playbook named by ``ansible.<playbook_key>`` and wait; never raises for a failed run."""
        playbook = self.settings[playbook_key]
        private_dir = tempfile.mkdtemp(prefix="%s-" % label, dir=self.runs_dir)
        errors = _EventErrors()
        started = time.monotonic()
        # With a ``binary`` ansible-runner passes only the command line we give (plus extravars): the playbook too.
        arguments = ["-e @%s" % shlex.quote(path) for path in self.settings["extravars_files"]]
        if self.settings["verbosity"]:
            arguments.append("-" + "v" * self.settings["verbosity"])
        arguments.append(shlex.quote(os.path.join(self.settings["project_dir"], playbook)))
        report_path = os.path.join(private_dir, "run-report.json")
        envvars = dict(RUN_ENV_DEFAULTS, **self.settings["env"])
        envvars.update({DAEMON_PID_ENV: str(os.getpid()), REPORT_ENV: report_path})
        kwargs = dict(private_data_dir=private_dir, project_dir=self.settings["project_dir"], playbook=playbook,
                      extravars=extravars, cmdline=" ".join(arguments), binary=self._guard, envvars=envvars,
                      timeout=self.settings["timeout"], quiet=True, event_handler=errors, cancel_callback=cancel,
                      settings={"suppress_ansible_output": True})
        if self.settings["inventory"]:
            kwargs["inventory"] = self.settings["inventory"]
        try:
            result = ansible_runner.run(**kwargs)
            status, rc, stats = result.status, result.rc, result.stats
        except Exception as exc:  # noqa: BLE001 -- a broken runner setup must fail the batch, not the daemon
            status, rc, stats = "error", None, None
            errors.error = errors.error or "ansible-runner could not run %s: %s" % (playbook, exc)
        outcome = outcome_of(status, rc, stats)
        killed = _killed_by(report_path) if outcome == "failed" else None
        if killed:
            outcome, errors.error = "killed", "ansible-playbook %s" % signal_text(killed)
        run_result = RunResult(playbook=playbook, outcome=outcome, rc=rc, duration=time.monotonic() - started,
                               refusals=errors.refusals,
                               stats=stats or {})
        if not run_result.ok:
            run_result.error = self._redact(errors.error or "%s ended %s (rc=%s)" % (playbook, outcome, rc))
            run_result.kept = self._keep(private_dir)
        shutil.rmtree(private_dir, ignore_errors=True)
        return run_result

    # -- failed runs ----------------------------------------------------------------------------------------

    def _keep(self, private_dir: str) -> str:
        keep = self.settings["keep_failed_runs"]
        if keep <= 0:
            return ""
        target = os.path.join(self.failed_dir, os.path.basename(private_dir))
        try:
            shutil.copytree(private_dir, target, symlinks=True)
            self._scrub(target)
        except OSError as exc:
            log.warning("could not keep failed run %s: %s", private_dir, exc)
            shutil.rmtree(target, ignore_errors=True)
            return ""
        self._prune(keep)
        return target

    def _scrub(self, root: str):
        """No environment and no known secret in what stays on disk."""
        for folder, _dirs, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                if name == "command" and os.path.basename(os.path.dirname(folder)) == "artifacts":
                    self._drop_environment(path)
                elif name in ("envvars", "passwords", "ssh_key", "env.list"):
                    os.remove(path)
                    continue
                if self._redact:
                    self._redact_file(path)

    @staticmethod
    def _drop_environment(path: str):
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            data["env"] = "(removed by cvmfs-publisher: the environment is not kept)"
            write_text_atomic(path, json.dumps(data))
        except (OSError, ValueError):
            os.remove(path)

    def _redact_file(self, path: str):
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as handle:
                text = handle.read()
        except OSError:
            return
        redacted = self._redact(text)
        if redacted != text:
            write_text_atomic(path, redacted)   # never a half-redacted artifact, whatever stops us

    def _prune(self, keep: int):
        kept = sorted((os.path.join(self.failed_dir, name) for name in os.listdir(self.failed_dir)),
                      key=os.path.getmtime)
        for path in kept[:-keep]:
            shutil.rmtree(path, ignore_errors=True)


def _killed_by(report_path: str) -> Optional[int]:
    """The signal that killed ansible-playbook, from the guard's report (None if it exited or nothing says)."""
    try:
        with open(report_path, encoding="utf-8") as handle:
            number = json.load(handle).get("signal")
    except (OSError, ValueError, AttributeError):
        return None
    return number if isinstance(number, int) else None
