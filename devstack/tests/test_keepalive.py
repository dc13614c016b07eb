"""devstack/keepalive.py: a crashed child is started again; any other end, or the keeper's own death, ends both."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

KEEPALIVE = Path(__file__).resolve().parents[1] / "keepalive.py"
# A child that crashes (SIGSEGV) the first time, then writes its PID and waits; or exits 3 when told to.
CHILD = """
import os, signal, sys, time
mark = sys.argv[1]
if not os.path.exists(mark + ".crashed"):
    open(mark + ".crashed", "w").close()
    os.kill(os.getpid(), signal.SIGSEGV)
if os.path.exists(mark + ".exit3"):
    sys.exit(3)
open(mark + ".pid", "w").write(str(os.getpid()))
time.sleep(120)
"""


def start(tmp_path):
    mark = str(tmp_path / "child")
    keeper = subprocess.Popen([sys.executable, str(KEEPALIVE), sys.executable, "-c", CHILD, mark],
                              stdout=subprocess.PIPE, text=True)
    return keeper, mark


def wait_for(path, timeout=30):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) or not open(path).read():
        assert time.monotonic() < deadline, "%s never appeared" % path
        time.sleep(0.05)
    return int(open(path).read())


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path("/proc/%d/stat" % pid).read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_crashed_child_is_started_again_and_dies_with_its_keeper(tmp_path):
    keeper, mark = start(tmp_path)
    child = wait_for(mark + ".pid")                    # the second start: the first crashed
    keeper.kill()                                      # what `stack stop radosgw` and `stack down` do
    keeper.wait(timeout=10)
    assert "died of SIGSEGV; starting it again (1 of at most" in keeper.stdout.read()
    deadline = time.monotonic() + 10
    while alive(child):
        assert time.monotonic() < deadline, "the child outlived its keeper"
        time.sleep(0.05)


def test_an_exit_code_ends_the_keeper_with_it(tmp_path):
    keeper, mark = start(tmp_path)
    Path(mark + ".crashed").touch()
    Path(mark + ".exit3").touch()
    assert keeper.wait(timeout=30) == 3


def test_sigterm_is_passed_on_and_not_restarted(tmp_path):
    keeper, mark = start(tmp_path)
    child = wait_for(mark + ".pid")
    keeper.send_signal(signal.SIGTERM)
    assert keeper.wait(timeout=10) == 128 + signal.SIGTERM
    assert not alive(child)
