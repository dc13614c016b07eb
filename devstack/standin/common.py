"""What every part of the stand-in shares: exit codes, the error type, atomic writes, repository paths, prompts,
and the two checks the real scripts make on the caller's process (cwd and open file descriptors)."""

from __future__ import annotations

import json
import os
import re
import sys

PROG = "cvmfs_server (stand-in)"
FQRN_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,59}$")

# Exit codes of the real tool (cmd_transaction.cc, cmd_abort.cc, shell `die` = 1, `usage` = 3).
EXIT_FAIL = 1
EXIT_ENOENT = 2
EXIT_USAGE = 3
EXIT_EINTR = 4
EXIT_EIO = 5
EXIT_EBUSY = 16
EXIT_EEXIST = 17
EXIT_ENOTDIR = 20
EXIT_EINVAL = 22


class StandinError(Exception):
    """A failure with the exit code the real cvmfs_server uses for it; ``stdout`` when the real one prints it there
    (the shell scripts' ``echo ...; retcode=1``)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAIL, stdout: bool = False):
        super().__init__(message)
        self.exit_code = exit_code
        self.stdout = stdout


def write_text_atomic(path: str, text: str, mode: int | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        if mode is not None:
            os.fchmod(handle.fileno(), mode)
        handle.write(text)
    os.replace(tmp, path)


def write_json_atomic(path: str, data) -> None:
    write_text_atomic(path, json.dumps(data, sort_keys=True, separators=(",", ":")))


def read_conf(path: str) -> dict:
    values = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            key, sep, value = line.strip().partition("=")
            if sep and not key.startswith("#"):
                values[key] = value
    return values


def normalize_repo_path(path: str, what: str) -> str:
    """'/a/b/' -> 'a/b'; '' or '/' -> '' (the repository root). Refuses '.', '..' and empty components."""
    parts = [part for part in path.split("/") if part != ""]
    if any(part in (".", "..") for part in parts):
        raise StandinError(f"invalid {what} {path!r}: '.' and '..' are not allowed", EXIT_EINVAL)
    return "/".join(parts)


def is_within(path: str, scope: str) -> bool:
    return scope == "" or path == scope or path.startswith(scope + "/")


def paths_overlap(first: str, second: str) -> bool:
    return is_within(first, second) or is_within(second, first)


def join_rel(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def confirm(question: str) -> bool:
    print(f"{question} (y/N)? ", end="", flush=True)
    answer = sys.stdin.readline().strip()
    return answer in ("y", "Y")


# ---------------------------------------------------------------------------------------------------------------
# The caller's process: is_cwd_on_path and the lsof-based fd counts of cvmfs_server_util.sh / _common.sh


def cwd_inside(union: str) -> bool:
    """True when the caller's working directory is the union dir or below it (is_cwd_on_path)."""
    try:
        cwd = os.getcwd()
    except FileNotFoundError:  # cwd deleted (e.g. a folder of the union removed by an abort)
        cwd = os.environ.get("PWD", "")
    union = os.path.realpath(union)
    return cwd == union or cwd.startswith(union + os.sep)


def refuse_cwd_inside(union: str, fqrn: str) -> None:
    if cwd_inside(union):
        raise StandinError(f"Current working directory is in /cvmfs/{fqrn}.  Please release, e.g. by 'cd $HOME'.",
                           stdout=True)


def open_fds_below(path: str) -> tuple[list, list]:
    """([(pid, file)] open for writing, [(pid, file)] open read-only) by any process we can see, below ``path``.

    The real tool counts them with lsof on the mount point; here /proc/<pid>/fd and fdinfo give the same."""
    root = os.path.realpath(path) + os.sep
    writable, read_only = [], []
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if not target.startswith(root):
                continue
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii") as handle:
                    flags = next(int(line.split()[1], 8) for line in handle if line.startswith("flags:"))
            except (OSError, StopIteration, ValueError):
                continue
            (writable if flags & (os.O_WRONLY | os.O_RDWR) else read_only).append((int(pid), target))
    return writable, read_only
