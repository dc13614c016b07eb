"""Runs ansible-playbook so that no process of a run can outlive the daemon, by construction.

ansible-core's workers call ``setsid()``, so a process-group kill never reaches the modules they run. Instead each
run lives in a PID namespace of its own, and the kernel kills every process of a PID namespace when its first
process (its "init") exits, however it exits::

    daemon ─► guard (PDEATHSIG: SIGKILL) ─► run init, PID 1 of a new PID namespace (PDEATHSIG: SIGKILL)
                                              └─► ansible-playbook ─► workers (setsid) ─► modules ─► cvmfs_server …

- the daemon dies (even ``kill -9``): the kernel kills the guard, then the run init, then the whole namespace;
- ansible-runner cancels or times out the run (SIGKILL of the guard's group), or SIGTERM: the same chain;
- ansible-playbook dies: the run init reaps it, reports how it ended, exits, and the namespace goes with it.

Creating a PID namespace needs CAP_SYS_ADMIN (the daemon runs as root to drive cvmfs_server). Without it the guard
falls back to being a child subreaper (every orphan of the run re-parents to it) that kills all its descendants
when the playbook ends or the daemon dies; that covers everything but a ``kill -9`` of the guard itself.

How the playbook ended goes to ``$CVMFS_PUBLISHER_RUN_REPORT`` (JSON) for the daemon: ``{"isolation": ...,
"exit": N}`` or ``{"isolation": ..., "signal": N}``; the guard's own exit code is the playbook's (128+N if killed).
"""
import ctypes
import json
import os
import select
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
CLONE_NEWPID = 0x20000000
DAEMON_PID_ENV = "CVMFS_PUBLISHER_DAEMON_PID"
REPORT_ENV = "CVMFS_PUBLISHER_RUN_REPORT"
ISOLATION_ENV = "CVMFS_PUBLISHER_RUN_ISOLATION"  # "subreaper" forces the fallback (its tests)
PID_NAMESPACE = "pid-namespace"
SUBREAPER = "subreaper"

_libc = None


def _prctl(option, value) -> bool:
    global _libc
    try:
        _libc = _libc or ctypes.CDLL(None, use_errno=True)
        return _libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False  # not Linux


def _unshare_pid() -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWPID) == 0
    except (OSError, AttributeError):
        return False


def _die_with_parent(expected_parent=None):
    """SIGKILL when our parent dies; if it already died before we asked, now."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if expected_parent and os.getppid() != expected_parent:
        os._exit(1)


def isolation_available() -> str:
    """Which isolation a run gets on this host (the daemon logs it once at start): probed in a throwaway child."""
    if os.environ.get(ISOLATION_ENV) == SUBREAPER:
        return SUBREAPER
    pid = os.fork()
    if pid == 0:
        os._exit(0 if _unshare_pid() else 1)
    status = os.waitpid(pid, 0)[1]
    return PID_NAMESPACE if os.waitstatus_to_exitcode(status) == 0 else SUBREAPER


def log_isolation(log):
    """The daemon's start-up line on which isolation its runs get."""
    from .logs import fields  # the guard itself never logs: keep its own start-up light
    isolation = isolation_available()
    if isolation == PID_NAMESPACE:
        log.info("each run gets a PID namespace: no process of a run outlives the daemon",
                 extra=fields(event="run_isolation", isolation=isolation))
    else:
        log.warning("no PID namespace for runs (needs CAP_SYS_ADMIN): a run's orphans are killed when it ends or "
                    "the daemon dies, but not if its guard process is killed itself",
                    extra=fields(event="run_isolation", isolation=isolation))


def _spawn(argv, close=()) -> int:
    """fork + exec of the playbook; the PID."""
    pid = os.fork()
    if pid == 0:
        for fd in close:
            os.close(fd)
        try:
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    return pid


# -- the run init: PID 1 of the run's namespace -----------------------------------------------------------------

def _run_init(argv, guard_alive: int, report: int) -> None:
    """Start the playbook, reap every process of the namespace, write the playbook's wait status, exit (which
    kills whatever is left in the namespace)."""
    _die_with_parent()
    if select.select([guard_alive], [], [], 0)[0]:
        os._exit(1)  # the guard died before we set PDEATHSIG (its end of the pipe closed)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    playbook = _spawn(argv, close=(report, guard_alive))
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(1)
        if pid == playbook:
            os.write(report, b"%d\n" % status)
            os._exit(0)


# -- the guard --------------------------------------------------------------------------------------------------

def _descendants() -> list:
    """PIDs of every process below us (as a subreaper, every orphan of the run is re-parented to us)."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name, "rb") as handle:
                    fields = handle.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            parents[int(name)] = int(fields[1])
    found, frontier = [], [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found.extend(children)
        frontier.extend(children)
    return found


def _kill_descendants():
    """SIGKILL everything below us and reap it, until nothing is left (a process may fork while we look)."""
    while True:
        pids = _descendants()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass


def _write_report(isolation: str, status):
    path = os.environ.get(REPORT_ENV)
    report = {"isolation": isolation}
    if status is None:
        report["lost"] = True
    elif os.WIFSIGNALED(status):
        report["signal"] = os.WTERMSIG(status)
    else:
        report["exit"] = os.waitstatus_to_exitcode(status)
    if path:
        try:
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(report, handle)
        except OSError:
            pass
    return report


def _exit_code(report) -> int:
    if "signal" in report:
        sys.stderr.write("cvmfs-publisher: ansible-playbook killed by signal %d\n" % report["signal"])
        return 128 + report["signal"]
    return report.get("exit", 1)


def _in_namespace(argv) -> int:
    guard_alive_read, guard_alive_write = os.pipe()
    report_read, report_write = os.pipe()
    init = os.fork()  # the first child after unshare() is PID 1 of the new namespace
    if init == 0:
        os.close(guard_alive_write)
        os.close(report_read)
        _run_init(argv, guard_alive_read, report_write)
    os.close(guard_alive_read)
    os.close(report_write)

    def stop(*_args):
        os.kill(init, signal.SIGKILL)  # the kernel then kills the whole namespace
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    os.waitpid(init, 0)
    with os.fdopen(report_read) as handle:
        text = handle.read().strip()
    return _exit_code(_write_report(PID_NAMESPACE, int(text) if text else None))


def _with_subreaper(argv) -> int:
    _prctl(PR_SET_CHILD_SUBREAPER, 1)

    def stop(*_args):
        _kill_descendants()
        os._exit(128 + signal.SIGTERM)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    expected = os.environ.get(DAEMON_PID_ENV)
    if expected and expected.isdigit() and os.getppid() != int(expected):
        stop()
    playbook = _spawn(argv)
    while True:
        try:
            status = os.waitpid(playbook, 0)[1]
            break
        except InterruptedError:
            continue
    _kill_descendants()  # anything still running is an orphan of the run
    return _exit_code(_write_report(SUBREAPER, status))


def main(playbook_bin: str) -> int:
    if os.getpid() != os.getpgid(0):
        os.setpgid(0, 0)  # started outside ansible-runner: still keep our own group
    expected = os.environ.get(DAEMON_PID_ENV)
    argv = [playbook_bin] + sys.argv[1:]
    if os.environ.get(ISOLATION_ENV) != SUBREAPER and _unshare_pid():
        _die_with_parent(int(expected) if expected and expected.isdigit() else None)
        return _in_namespace(argv)
    return _with_subreaper(argv)
