"""The command line: ``cvmfs_server (stand-in) <command> ...`` -> the command functions; exit codes as the real
tool's (a StandinError carries its code; an OSError is the shell's ``die``, 1)."""

from __future__ import annotations

import argparse
import os
import sys

from .common import EXIT_FAIL, PROG, StandinError
from .ingest import cmd_ingest
from .mkfs import cmd_list, cmd_mkfs, cmd_rmfs
from .transaction import cmd_abort, cmd_publish, cmd_transaction


class Parser(argparse.ArgumentParser):
    """Usage errors exit 1 like the real tool's `die` (argparse's 2 would read as ENOENT)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_FAIL, f"{PROG}: {message}\n")


def accept_ignored(parser: argparse.ArgumentParser, flags: tuple, options: tuple) -> None:
    """Options of the real tool that change nothing the stand-in models: accepted so that callers need no branch."""
    for flag in flags:
        parser.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    for option in options:
        parser.add_argument(option, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description=(
        f"{PROG}: reproduces the gateway-publisher commands of CernVM-FS's cvmfs_server under $CVMFS_STANDIN_ROOT "
        "for development and tests. Not the real tool: no FUSE, no OverlayFS, no gateway, no signing."))
    commands = parser.add_subparsers(dest="command", metavar="command", parser_class=Parser)
    commands.required = True

    mkfs = commands.add_parser("mkfs", help="create a gateway publisher for a repository")
    mkfs.add_argument("-w", dest="stratum0", metavar="STRATUM0_URL")
    mkfs.add_argument("-u", dest="upstream", metavar="gw,TXN_DIR,GATEWAY_URL")
    mkfs.add_argument("-k", dest="keys", metavar="KEY_DIR")
    mkfs.add_argument("-o", dest="owner")
    mkfs.add_argument("-f", dest="unionfs")
    mkfs.add_argument("-a", dest="hash_algorithm")
    mkfs.add_argument("-x", dest="proxy")
    mkfs.add_argument("-z", dest="gc", action="store_true")
    mkfs.add_argument("-g", dest="no_autotag", action="store_true")
    accept_ignored(mkfs, flags=("-m", "-v", "-p", "-X", "-R"), options=("-G", "-V", "-Z", "-s"))
    mkfs.add_argument("fqrn")
    mkfs.set_defaults(func=cmd_mkfs)

    transaction = commands.add_parser("transaction", help="open a transaction: <fqrn>[/<lease path>]")
    transaction.add_argument("-t", "--retry-timeout", type=int, metavar="SECONDS",
                             help="retry a busy lease for this many whole seconds (0 = forever)")
    transaction.add_argument("-T", "--template")
    transaction.add_argument("repository")
    transaction.set_defaults(func=cmd_transaction)

    publish = commands.add_parser("publish", help="publish the open transaction as a new revision")
    publish.add_argument("-a", dest="tag")
    publish.add_argument("-m", dest="message")
    publish.add_argument("-f", dest="force", action="store_true",
                         help="do not ask about read-only file descriptors open on the union dir")
    accept_ignored(publish, flags=("-v", "-e", "-d", "-p", "-X", "-N"), options=("-n", "-Z", "-F", "-c"))
    publish.add_argument("repository")
    publish.set_defaults(func=cmd_publish)

    abort = commands.add_parser("abort", help="discard the open transaction")
    abort.add_argument("-f", dest="force", action="store_true")
    abort.add_argument("repository")
    abort.set_defaults(func=cmd_abort)

    ingest = commands.add_parser("ingest", help="unpack an uncompressed tar (or '-') under a base dir, or delete "
                                                "one path, as one revision")
    ingest.add_argument("-t", "--tar_file")
    ingest.add_argument("-b", "--base_dir")
    ingest.add_argument("-d", "--delete", action="append")
    ingest.add_argument("-c", "--catalog", action="store_true")
    ingest.add_argument("-k", "--keep_ownership", action="store_true", help=argparse.SUPPRESS)
    ingest.add_argument("-u", "--uid", help=argparse.SUPPRESS)
    ingest.add_argument("-g", "--gid", help=argparse.SUPPRESS)
    ingest.add_argument("repository")
    ingest.set_defaults(func=cmd_ingest)

    listing = commands.add_parser("list", help="one line per repository")
    listing.set_defaults(func=cmd_list)

    rmfs = commands.add_parser("rmfs", help="remove a repository's publisher side")
    rmfs.add_argument("-f", dest="force", action="store_true")
    rmfs.add_argument("-p", dest="preserve_keys", action="store_true")
    rmfs.add_argument("repository")
    rmfs.set_defaults(func=cmd_rmfs)
    return parser


def main(argv: list | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = os.environ.get("CVMFS_STANDIN_ROOT")
    if not root:
        print(f"{PROG}: CVMFS_STANDIN_ROOT is not set: it names the folder the stand-in maps /etc/cvmfs, "
              "/var/spool/cvmfs and /cvmfs into", file=sys.stderr)
        return EXIT_FAIL
    try:
        return args.func(root, args)
    except StandinError as error:
        print(f"{PROG}: {error}", file=sys.stdout if error.stdout else sys.stderr)
        return error.exit_code
    except OSError as error:  # the real tool dies (exit 1) on I/O errors too
        print(f"{PROG}: {error}", file=sys.stderr)
        return EXIT_FAIL
