"""Runs ansible-playbook so that it cannot outlive the daemon.

ansible-runner starts this (as its ``binary``) in a new session, so everything the playbook starts shares our
process group. We ask Linux to send us SIGTERM when the daemon's thread that started us dies (prctl
PR_SET_PDEATHSIG), and on that signal, or the runner's own cancel/timeout, kill the whole group. Without it a
``kill -9`` of the daemon would leave a playbook mid-transaction while a restarted daemon starts another one.
The next sync run finds the interrupted transaction and aborts it (the sync playbook's recovery).
"""
import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1
DAEMON_PID_ENV = "CVMFS_PUBLISHER_DAEMON_PID"


def _kill_group(*_args):
    os.killpg(os.getpgid(0), signal.SIGKILL)


def _die_with_parent():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: the runner's timeout still bounds the run
    # The daemon may have died between our fork and prctl.
    expected = os.environ.get(DAEMON_PID_ENV)
    if expected and expected.isdigit() and os.getppid() != int(expected):
        _kill_group()


def main(playbook_bin: str) -> int:
    if os.getpid() != os.getpgid(0):
        os.setpgid(0, 0)  # started outside ansible-runner: still keep our own group
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _kill_group)
    _die_with_parent()
    child = subprocess.Popen([playbook_bin] + sys.argv[1:])
    return child.wait()
