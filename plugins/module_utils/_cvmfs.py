# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""The CVMFS side of a gateway publisher host: ``cvmfs_server`` commands and the repository files they leave.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.

Every path the real tool uses is taken under ``cvmfs_root`` (empty in production), so the same code drives the
real ``cvmfs_server`` and the local stand-in. The repository's state is read from its files
(``repositories.d/<fqrn>/server.conf``, the spool's ``in_transaction.lock``), never guessed from messages:
the tool's exit codes and files are its contract, its wording is not. Key files: ``_cvmfs_keys.py``.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import random
import re
import shlex
import subprocess
import time

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._module import PublisherError

# Options shared by the modules that run cvmfs_server (documented in doc_fragments/cvmfs.py).
CVMFS_ARGSPEC = dict(
    cvmfs_server_bin=dict(type="str", default="cvmfs_server"),
    cvmfs_root=dict(type="str", default=""),
)

DEFAULT_KEYS_DIR = "/etc/cvmfs/keys"

# cvmfs_publish exit codes (cvmfs/publish/cmd_transaction.cc), kept so callers can tell them apart.
RC_NOT_FOUND = 1
RC_LEASE_PARENT_MISSING = 2
RC_LEASE_BUSY = 16
RC_ALREADY_IN_TRANSACTION = 17
RC_NOT_IN_TRANSACTION = 22

STDERR_TAIL_LINES = 20


class CvmfsError(PublisherError):
    """A CVMFS-side failure (configuration, keys, paths)."""


class CvmfsCommandError(CvmfsError):
    """``cvmfs_server`` exited non-zero; ``rc`` is its exit code (see the RC_* constants)."""

    def __init__(self, command, rc, stdout, stderr):
        self.command = command
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr
        shown = display_command(command)
        tail = stderr_tail(stderr) or stderr_tail(stdout)
        super(CvmfsCommandError, self).__init__(
            "%s failed with exit code %s%s" % (shown, rc, (": " + tail) if tail else " (no output)"),
            command=shown, rc=rc, stderr=tail)


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers


def rooted(root, path):
    """``path`` (absolute, as the real tool sees it) under the stand-in ``root``; ``path`` itself when root is empty."""
    if not root:
        return path
    return os.path.join(root, path.lstrip("/"))


def _strip_shell_comment(line):
    """``line`` without its comment: as in a shell, ``#`` starts one only outside quotes and at a word's start."""
    quote = None
    escaped = False
    for index, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def parse_server_conf(text):
    """The KEY=value assignments of a shell configuration file (server.conf) as a dict.

    Handles comments, blank lines, ``export``, single and double quotes and trailing comments the way a
    shell would for these plain assignments; lines that are not assignments are ignored.
    """
    values = {}
    for line in text.splitlines():
        try:
            words = shlex.split(_strip_shell_comment(line))
        except ValueError:  # unbalanced quote: not a line cvmfs_server writes; skip rather than guess
            continue
        if words and words[0] == "export":
            words = words[1:]
        if len(words) != 1 or "=" not in words[0]:
            continue
        key, value = words[0].split("=", 1)
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            values[key] = value
    return values


def parse_list_output(text):
    """``cvmfs_server list`` lines ``<fqrn> (stratum0 / gw - in transaction)`` as dicts."""
    repositories = []
    for line in text.splitlines():
        match = re.match(r"^\s*(\S+)\s+\(([^)]*)\)", line)
        if not match:
            continue
        fields = [part.strip() for part in match.group(2).split(" - ")]
        kinds = [part.strip() for part in fields[0].split("/")]
        repositories.append(dict(
            name=match.group(1),
            type=kinds[0],
            upstream_type=kinds[1] if len(kinds) > 1 else None,
            in_transaction="in transaction" in fields[1:],
            flags=fields[1:],
        ))
    return repositories


def display_command(argv):
    """A command line fit for a message: quoted, and with any user:password in URLs hidden."""
    return " ".join(shlex.quote(re.sub(r"(://)[^/@\s]+@", r"\1***@", arg)) for arg in argv)


def stderr_tail(text, lines=STDERR_TAIL_LINES):
    text = (text or "").strip()
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------------------------
# cvmfs_server and the files it keeps


def _run_subprocess(argv):
    # The exit code is the answer (see the contract), not an error: check=False.
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, check=False)
    return proc.returncode, proc.stdout, proc.stderr


class CvmfsServer:
    """The ``cvmfs_server`` commands a gateway publisher uses, and the repository files they leave behind.

    Commands return ``(rc, stdout, stderr)`` on success and raise ``CvmfsCommandError`` (with ``.rc``) otherwise.
    ``runner(argv) -> (rc, stdout, stderr)`` is injectable so tests and callers with their own process
    handling (e.g. AnsibleModule.run_command) can drive it.
    """

    def __init__(self, binary="cvmfs_server", root="", runner=None):
        self.binary = binary or "cvmfs_server"
        self.root = root or ""
        self.runner = runner or _run_subprocess

    @classmethod
    def from_params(cls, params, runner=None):
        return cls(params.get("cvmfs_server_bin"), params.get("cvmfs_root"), runner)

    @classmethod
    def for_module(cls, module):
        """Commands run through AnsibleModule.run_command (argv as given: no ~ or $VAR expansion)."""
        return cls.from_params(module.params, runner=lambda argv: module.run_command(
            argv, handle_exceptions=False, expand_user_and_vars=False))

    # -- paths -------------------------------------------------------------------------------------------------
    def path(self, real_path):
        return rooted(self.root, real_path)

    def config_dir(self, fqrn):
        return self.path("/etc/cvmfs/repositories.d/%s" % fqrn)

    def server_conf(self, fqrn):
        return os.path.join(self.config_dir(fqrn), "server.conf")

    def spool_dir(self, fqrn):
        return self.path("/var/spool/cvmfs/%s" % fqrn)

    def union_dir(self, fqrn):
        """Where files are written during a transaction (``/cvmfs/<fqrn>``)."""
        return self.path("/cvmfs/%s" % fqrn)

    def default_keys_dir(self):
        return self.path(DEFAULT_KEYS_DIR)

    # -- state from files ----------------------------------------------------------------------------------------
    def read_config(self, fqrn):
        """The repository's server.conf as a dict, or None when the repository does not exist."""
        path = self.server_conf(fqrn)
        try:
            with open(path, "r") as handle:
                return parse_server_conf(handle.read())
        except FileNotFoundError:
            if os.path.isdir(self.config_dir(fqrn)):
                raise CvmfsError("repository %s is half-created: %s exists without server.conf; remove it with "
                                 "'cvmfs_server rmfs -f %s' and run again" % (fqrn, self.config_dir(fqrn), fqrn))
            return None
        except (IOError, OSError) as exc:
            raise CvmfsError("cannot read %s: %s" % (path, exc.strerror or exc))

    def in_transaction(self, fqrn):
        return os.path.exists(os.path.join(self.spool_dir(fqrn), "in_transaction.lock"))

    def repository_facts(self, fqrn):
        config = self.read_config(fqrn)
        if config is None:
            return dict(name=fqrn, exists=False, stratum0=None, upstream=None, owner=None, in_transaction=False)
        return dict(name=fqrn, exists=True, stratum0=config.get("CVMFS_STRATUM0"),
                    upstream=config.get("CVMFS_UPSTREAM_STORAGE"), owner=config.get("CVMFS_USER"),
                    in_transaction=self.in_transaction(fqrn))

    # -- commands ------------------------------------------------------------------------------------------------
    def run(self, *args):
        argv = [self.binary] + [str(arg) for arg in args]
        try:
            rc, stdout, stderr = self.runner(argv)
        except OSError as exc:
            raise CvmfsError("cannot run %s: %s (set cvmfs_server_bin to the cvmfs_server executable)"
                             % (self.binary, exc.strerror or exc))
        if rc != 0:
            raise CvmfsCommandError(argv, rc, stdout, stderr)
        return rc, stdout, stderr

    def command(self, *args):
        """The command line ``run(*args)`` runs, fit for messages and results (see display_command)."""
        return display_command([self.binary] + [str(arg) for arg in args])

    def mkfs(self, fqrn, stratum0_url, upstream, keys_dir, owner, check_mode=False):
        """Create a gateway repository; returns the command line, which only runs outside check mode."""
        args = ("mkfs", "-w", stratum0_url, "-u", upstream, "-k", keys_dir, "-o", owner, fqrn)
        if not check_mode:
            self.run(*args)
        return self.command(*args)

    def rmfs(self, fqrn, keep_keys=False, check_mode=False):
        """Remove a repository (``-p``: keep its keys); returns the command line, run only outside check mode."""
        args = ("rmfs", "-f") + (("-p",) if keep_keys else ()) + (fqrn,)
        if not check_mode:
            self.run(*args)
        return self.command(*args)

    def transaction(self, fqrn, retry_timeout=None, subpath=None):
        """Open a transaction (a gateway lease on ``subpath`` when given); ``retry_timeout`` seconds of retries
        while the lease is busy (``-t``; 0 = forever). Raises CvmfsCommandError rc 17/16/2/1 (RC_*)."""
        target = fqrn if not subpath else "%s/%s" % (fqrn, subpath.strip("/"))
        args = ["transaction"]
        if retry_timeout is not None:
            args += ["-t", int(retry_timeout)]
        return self.run(*(args + [target]))

    def publish(self, fqrn):
        return self.run("publish", fqrn)

    def abort(self, fqrn):
        """Discard the open transaction without prompting (``abort -f``); rc 22 when none is open."""
        return self.run("abort", "-f", fqrn)

    def ingest(self, fqrn, tar, base_dir, delete_path=None):
        """Ingest a tarball (a path, or ``-`` for stdin) under ``base_dir`` in its own transaction;
        ``delete_path`` is removed first in the same revision."""
        args = ["ingest", "-t", tar, "-b", base_dir]
        if delete_path:
            args += ["-d", delete_path]
        return self.run(*(args + [fqrn]))

    def list(self):
        """The repositories of this host as dicts (name, type, upstream_type, in_transaction, flags)."""
        return parse_list_output(self.run("list")[1])


# ---------------------------------------------------------------------------------------------------------------
# Driving cvmfs_server through a publish: busy retries, a quiet abort, the revision published

# cvmfs_server exit codes worth another attempt: a lease held by another publisher, a transaction just opened.
RETRYABLE_RCS = (RC_LEASE_BUSY, RC_ALREADY_IN_TRANSACTION)
_REVISION_IN_OUTPUT = re.compile(r"\brevision (\d+)\b")


def with_busy_retries(func, retries, sleep=time.sleep, what="open a transaction"):
    """Call ``func``; on cvmfs_server exit code 16 (lease busy) or 17 (already in a transaction) retry with
    jittered exponential backoff, then fail with a message that says what was going on."""
    for attempt in range(retries + 1):
        try:
            return func()
        except CvmfsCommandError as exc:
            if exc.rc not in RETRYABLE_RCS:
                raise
            if attempt >= retries:
                why = ("its lease path is busy (another publisher holds an overlapping lease)"
                       if exc.rc == RC_LEASE_BUSY else "another transaction is open on it")
                raise CvmfsError("cannot %s: %s; gave up after %d attempts (exit code %d): %s"
                                 % (what, why, retries + 1, exc.rc, exc.msg), rc=exc.rc)
            sleep(random.uniform(0.5, 1.0) * min(30.0, 2.0 ** attempt))


def published_revision(server, fqrn, output):
    """The revision just published: the client-visible ``user.revision`` attribute of /cvmfs/<fqrn> when the
    mount provides it, else the number the tool printed; None when neither says."""
    try:
        return int(os.getxattr(server.union_dir(fqrn), "user.revision"))
    except (AttributeError, OSError, ValueError):
        pass
    match = _REVISION_IN_OUTPUT.search(output or "")
    return int(match.group(1)) if match else None


def abort_quietly(server, fqrn):
    """``abort -f``; returns None, or the text of its failure for the error message (22 = nothing to abort)."""
    try:
        server.abort(fqrn)
    except CvmfsCommandError as exc:
        if exc.rc != RC_NOT_IN_TRANSACTION:
            return exc.msg
    return None
