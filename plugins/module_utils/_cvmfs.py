# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""The CVMFS side of a gateway publisher host: ``cvmfs_server`` commands and the repository files they leave.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.

Every path the real tool uses is taken under ``cvmfs_root`` (empty in production), so the same code drives the
real ``cvmfs_server`` and the local stand-in. The repository's state is read from its files
(``repositories.d/<fqrn>/server.conf``, the spool's ``in_transaction.lock``), never guessed from messages:
the tool's exit codes and files are its contract, its wording is not. Key files: ``_cvmfs_keys.py``; retrying a
busy lease and aborting quietly, as a sync does: ``_transaction.py``.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import gzip
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading

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
RC_LEASE_PARENT_NOT_A_DIRECTORY = 20
RC_NOT_IN_TRANSACTION = 22

# Every cvmfs_server command runs from "/" (publish, ingest and abort fail when the caller's cwd is inside
# /cvmfs/<fqrn>) and never asks about read-only file descriptors on the union mount (it would answer "no" and fail).
COMMAND_CWD = "/"
COMMAND_ENV = {"CVMFS_FORCE_REMOUNT_WARNING": "false"}
# What the gateway-mode ingest script dies with when it cannot open its transaction (busy or already-open lease):
# its exit code is then 1, never 16/17 (cvmfs_server_ingest.sh).
INGEST_NO_TRANSACTION = "Impossible to start a transaction"
# The published revision, as `attr -qg revision /var/spool/cvmfs/<fqrn>/rdonly` reads it.
REVISION_XATTR = "user.revision"
# A gzip stream starts with these bytes (.tar.gz, .tgz); the real ingest reads uncompressed tar only.
GZIP_MAGIC = b"\x1f\x8b"

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
                          universal_newlines=True, check=False, cwd=COMMAND_CWD, env=dict(os.environ, **COMMAND_ENV))
    return proc.returncode, proc.stdout, proc.stderr


def open_tarball(path):
    """A file object reading ``path`` as an uncompressed tar: gzip is decompressed on the fly (by content, not
    name: a .tgz holding a plain tar works too)."""
    with open(path, "rb") as handle:
        magic = handle.read(len(GZIP_MAGIC))
    return gzip.GzipFile(path, "rb") if magic == GZIP_MAGIC else open(path, "rb")


def _run_with_stdin(argv, source):
    """Run ``argv`` with ``source`` (a binary file object) streamed to its stdin; (rc, stdout, stderr)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=COMMAND_CWD,
                                env=dict(os.environ, **COMMAND_ENV))
        failure = []

        def feed():
            try:
                shutil.copyfileobj(source, proc.stdin, 1 << 20)
            except BrokenPipeError:
                pass  # the command stopped reading: its exit code tells why
            except (IOError, OSError, EOFError, ValueError) as exc:  # a corrupt compressed stream
                failure.append(exc)
            finally:
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass

        feeder = threading.Thread(target=feed)
        feeder.start()
        rc = proc.wait()
        feeder.join()
        out.seek(0)
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
        if failure:
            stderr += "\ncannot decompress the tarball: %s" % failure[0]
            rc = rc or 1
        return rc, out.read().decode("utf-8", "replace"), stderr


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
            argv, handle_exceptions=False, expand_user_and_vars=False, cwd=COMMAND_CWD, environ_update=COMMAND_ENV))

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

    def session_token(self, fqrn):
        """The gateway lease token of an open (or half-closed) transaction; ``transaction`` reuses it if present."""
        return os.path.join(self.spool_dir(fqrn), "session_token")

    # -- state from files ----------------------------------------------------------------------------------------
    def read_config(self, fqrn):
        """The repository's server.conf as a dict, or None when the repository does not exist."""
        path = self.server_conf(fqrn)
        try:
            with open(path, "r") as handle:
                return parse_server_conf(handle.read())
        except FileNotFoundError:
            if os.path.isdir(self.config_dir(fqrn)):
                return {}  # half-created: the folder without server.conf (see missing_parts)
            return None
        except (IOError, OSError) as exc:
            raise CvmfsError("cannot read %s: %s" % (path, exc.strerror or exc))

    def in_transaction(self, fqrn):
        return os.path.exists(os.path.join(self.spool_dir(fqrn), "in_transaction.lock"))

    def missing_parts(self, fqrn):
        """What a repository whose configuration exists lacks to be usable: mkfs writes server.conf *before*
        importing keys and creating the spool and the union mount, so a failed mkfs leaves config without them."""
        missing = []
        if not os.path.isfile(self.server_conf(fqrn)):
            missing.append(self.server_conf(fqrn))
        for suffix in ("crt", "pub", "gw"):
            path = os.path.join(self.default_keys_dir(), "%s.%s" % (fqrn, suffix))
            if not os.path.isfile(path):
                missing.append(path)
        for folder in (self.spool_dir(fqrn), self.union_dir(fqrn)):
            if not os.path.isdir(folder):
                missing.append(folder)
        return missing

    def has_session_token(self, fqrn):
        return os.path.exists(self.session_token(fqrn))

    def mounted_revision(self, fqrn):
        """The revision the repository's rdonly mount shows (its ``user.revision`` attribute); None if unreadable.
        Never parsed from command output: in gateway mode ``publish`` prints no revision number."""
        try:
            return int(os.getxattr(self.path("/var/spool/cvmfs/%s/rdonly" % fqrn), REVISION_XATTR))
        except (OSError, ValueError):
            return None

    def repository_facts(self, fqrn):
        config = self.read_config(fqrn)
        if config is None:
            return dict(name=fqrn, exists=False, stratum0=None, upstream=None, owner=None, in_transaction=False)
        return dict(name=fqrn, exists=True, stratum0=config.get("CVMFS_STRATUM0"),
                    upstream=config.get("CVMFS_UPSTREAM_STORAGE"), owner=config.get("CVMFS_USER"),
                    in_transaction=self.in_transaction(fqrn))

    # -- commands ------------------------------------------------------------------------------------------------
    def run(self, *args, **kwargs):
        """Run a command; ``stdin`` (a binary file object), when given, is streamed to it."""
        argv = [self.binary] + [str(arg) for arg in args]
        stdin = kwargs.pop("stdin", None)
        try:
            rc, stdout, stderr = self.runner(argv) if stdin is None else _run_with_stdin(argv, stdin)
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
        """``publish -f``: a reader holding a file open on /cvmfs/<fqrn> must not make it prompt (and fail)."""
        return self.run("publish", "-f", fqrn)

    def abort(self, fqrn):
        """Discard the open transaction without prompting (``abort -f``); rc 22 when none is open."""
        return self.run("abort", "-f", fqrn)

    def ingest(self, fqrn, tarball, base_dir):
        """Unpack the tarball at path ``tarball`` (merging) under ``base_dir`` as a revision of its own (ingest opens
        its own transaction). Compressed tarballs are decompressed on the fly into ``-t -``: ingest reads plain tar
        only. A gateway cannot delete in the same call (``-t`` with ``-d`` dies): this method never offers it.
        Exit code 1 when the transaction could not be opened (busy lease: see INGEST_NO_TRANSACTION), never 16/17."""
        source = open_tarball(tarball)
        with source:
            if isinstance(source, gzip.GzipFile):
                return self.run("ingest", "-t", "-", "-b", base_dir, fqrn, stdin=source)
        return self.run("ingest", "-t", tarball, "-b", base_dir, fqrn)

    def list(self):
        """The repositories of this host as dicts (name, type, upstream_type, in_transaction, flags)."""
        return parse_list_output(self.run("list")[1])
