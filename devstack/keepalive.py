#!/usr/bin/env python3
"""Run a daemon as a child and start it again when it crashes, as systemd does on a real site.

    keepalive.py <command> [args...]

On a site, radosgw runs under systemd (ceph-radosgw@.service, Restart=on-failure), so a crash costs its clients a
few seconds, not the service. Debian 12's radosgw 16.2.15 does crash now and then under the scale-out tests'
load (SIGSEGV in a `msgr-worker` thread, no usable backtrace; an abort in `notif-worker0` when a broker node it
pushes to goes away, which the stack's ceph.conf lets end the process: `fatal signal handlers = false`, since Ceph's
own handler hung on the corrupted heap), so the local stack keeps it alive the same way:

- the child is started again when it dies of a crash signal (SIGSEGV, SIGABRT, SIGBUS, SIGILL, SIGFPE), at most
  MAX_RESTARTS times, after a line in the log that says so;
- any other end (an exit code, SIGKILL, SIGTERM) ends this process too, with the child's status;
- the child dies with this process (PR_SET_PDEATHSIG): the stack records and signals this process's PID, so
  `devstack/stack stop radosgw` (SIGKILL: a crash of the whole service) still leaves radosgw down until
  `devstack/stack start radosgw`, and `stack down` leaves nothing behind. SIGTERM and SIGINT are passed on.
"""
import ctypes
import signal
import subprocess
import sys
import time

CRASHES = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE}
MAX_RESTARTS = 10
PR_SET_PDEATHSIG = 1


def _die_with_parent():
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main(argv):
    if not argv:
        print("usage: keepalive.py <command> [args...]", file=sys.stderr)
        return 2
    child = None
    stopping = False

    def pass_on(signum, _frame):
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, pass_on)
    signal.signal(signal.SIGINT, pass_on)
    restarts = 0
    while True:
        child = subprocess.Popen(argv, preexec_fn=_die_with_parent)
        status = child.wait()
        crashed = status < 0 and -status in CRASHES
        if stopping or not crashed or restarts >= MAX_RESTARTS:
            return status if status >= 0 else 128 - status
        restarts += 1
        print("keepalive: %s (PID %d) died of %s; starting it again (%d of at most %d)"
              % (argv[0], child.pid, signal.Signals(-status).name, restarts, MAX_RESTARTS), flush=True)
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
