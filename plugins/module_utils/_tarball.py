# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""Whether a staged tarball may be published: judged as extraction would resolve it, before anything is applied.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.

``judge(path, limits, scratch_parent)`` reads the tarball once, streamed, and replays its *shape* into a private
scratch folder with the standard library's own extraction and its ``"data"`` filter (PEP 706): every member is
extracted in order with its content cut to zero bytes, so directories and symbolic links exist exactly as a real
extraction would have made them, and each later member's name and link target are resolved by the filter through
them (``b -> .`` then ``c -> b/b/b/../../../etc/passwd`` is caught, where normalising the link text alone is not).
On top of the filter, the publisher's own rules: no hard links (``ingest`` and the gateway cannot keep them inside
one folder reliably), no absolute names (the filter would silently strip the ``/``), no ``..``, whiteouts
(``.wh.*``), control characters or over-long names, nothing under a top-level ``.cvmfs``, a ``.cvmfscatalog``
only as a regular file, no devices or FIFOs.

Limits (expanded size, member count, expansion ratio) are checked from the member headers as the tarball is read,
so a decompression bomb is refused after reading at most the limit, never expanded in full.

The first refused member refuses the whole tarball: the result is the reason (naming the member, or giving the
figure that went over a limit), or None when the tarball may be published. Nothing here is transient: the same
bytes always get the same answer, so a refusal can be remembered per ETag.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import posixpath
import shutil
import sys
import tarfile
import tempfile

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _sync_plan as sp

# Kinds of refusal (the daemon's counter label): a refused member, a limit passed, not a readable tar archive.
MEMBER = "tarball"
LIMIT = "limit"
CORRUPT = "corrupt"
MIB = 1 << 20
GIB = 1 << 30


class Unavailable(Exception):
    """This Python cannot judge tarballs (no extraction filters): an operator problem, not the tarball's."""


class Limits:
    """Per-tarball bounds; ``None`` (or 0) switches one off.

    The expansion ratio (sum of member sizes / bytes of the tarball as stored) only counts once the expanded
    size passes ``ratio_floor_bytes``: tar's own padding makes tiny archives compress a hundredfold.
    """

    __slots__ = ("max_expanded_bytes", "max_members", "max_ratio", "ratio_floor_bytes")

    def __init__(self, max_expanded_bytes=20 * GIB, max_members=1000000, max_ratio=200, ratio_floor_bytes=16 * MIB):
        self.max_expanded_bytes = max_expanded_bytes
        self.max_members = max_members
        self.max_ratio = max_ratio
        self.ratio_floor_bytes = ratio_floor_bytes

    @classmethod
    def from_params(cls, params):
        """The module options ``tarball_max_expanded_bytes``, ``tarball_max_members``, ``tarball_max_ratio``."""
        default = cls()
        return cls(max_expanded_bytes=_option(params, "tarball_max_expanded_bytes", default.max_expanded_bytes),
                   max_members=_option(params, "tarball_max_members", default.max_members),
                   max_ratio=_option(params, "tarball_max_ratio", default.max_ratio))


def _option(params, name, default):
    value = params.get(name)
    return default if value is None else value


LIMIT_OPTIONS = dict(
    tarball_max_expanded_bytes=dict(type="int"),
    tarball_max_members=dict(type="int"),
    tarball_max_ratio=dict(type="int"),
)


def human_bytes(count):
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if count >= size:
            return "%.1f %s" % (count / size, unit)
    return "%d bytes" % count


# ---------------------------------------------------------------------------------------------------------------
# One member


def member_problem(member):
    """The publisher's own rules for one member (on top of the "data" filter); None when it passes them."""
    name = member.name
    what = "member %r" % name
    if name.startswith("/"):
        return "%s has an absolute name" % what
    clean = name[2:] if name.startswith("./") else name
    clean = clean.rstrip("/") if member.isdir() else clean
    if clean in ("", "."):
        return None if member.isdir() else "%s has no name" % what
    try:
        sp.check_relative_path(clean, what)
    except sp.Refused as exc:
        return str(exc)
    if member.islnk():
        return "%s is a hard link (to %r); hard links are not published, use a symbolic link or a copy" % (
            what, member.linkname)
    if not (member.isreg() or member.isdir() or member.issym()):
        return "%s is a device file, FIFO or other special file" % what
    if posixpath.basename(clean) == ".cvmfscatalog" and not member.isreg():
        return "%s: '.cvmfscatalog' must be a regular file" % what
    if member.issym():
        if not member.linkname:
            return "%s is a symbolic link with an empty target" % what
        if member.linkname.startswith("/"):
            return "%s is a symbolic link to the absolute path %r" % (what, member.linkname)
        if sp.has_control_character(member.linkname):
            return "%s is a symbolic link whose target contains a control character" % what
    return None


def _filter_problem(exc):
    """The operator's and uploader's wording of a "data" filter refusal (never the scratch path)."""
    member = exc.tarinfo
    what = "member %r" % member.name
    if isinstance(exc, tarfile.LinkOutsideDestinationError):
        return "%s is a symbolic link to %r, which resolves outside the tarball's folder (through the " \
               "tarball's own links)" % (what, member.linkname)
    if isinstance(exc, tarfile.OutsideDestinationError):
        return "%s would be written outside the tarball's folder (through a symbolic link the tarball " \
               "made earlier)" % what
    if isinstance(exc, tarfile.AbsoluteLinkError):
        return "%s is a link to the absolute path %r" % (what, member.linkname)
    if isinstance(exc, tarfile.SpecialFileError):
        return "%s is a device file, FIFO or other special file" % what
    return "%s refused by the safe extraction filter: %s" % (what, type(exc).__name__)


def _replaces_directory(member, scratch):
    """A link or file over a directory an earlier member made: refused (tarfile would fail, or for a link copy
    its target instead, and ingest would mix the two)."""
    if member.isdir():
        return None
    target = os.path.join(scratch, member.name)
    if os.path.isdir(target) and not os.path.islink(target):
        return "member %r would replace the directory an earlier member made" % member.name
    return None


def _replay(archive, member, scratch):
    """Extract ``member``'s shape into ``scratch``: the stdlib extraction with the "data" filter for files and
    directories; for a symbolic link the "data" filter, then the link made as tarfile makes it, minus tarfile's
    fallback of copying the target when the link cannot be made (unfiltered before Python 3.11.13; here that
    member is refused instead)."""
    if not member.issym():
        archive.extract(member, scratch, set_attrs=False, filter=_shape_filter)
        return
    tarfile.data_filter(member, scratch)
    target = os.path.join(scratch, member.name)
    parent = os.path.dirname(target)
    if not os.path.exists(parent):
        os.makedirs(parent)
    if os.path.lexists(target):
        os.unlink(target)
    os.symlink(member.linkname, target)


def _shape_filter(member, dest):
    """The stdlib "data" filter, then the content cut to nothing: the scratch copy holds only the tree's shape."""
    shape = tarfile.data_filter(member, dest).replace(deep=False)
    if shape.isreg():
        shape.size, shape.sparse = 0, None
    return shape


# ---------------------------------------------------------------------------------------------------------------
# The whole tarball


def judge(path, limits=None, scratch_parent=None):
    """None when the tarball at ``path`` may be published, else the reason (one sentence naming the member or
    the limit and the figure). ``scratch_parent``: where the zero-byte replay goes (default: the system temp)."""
    verdict = judge_verdict(path, limits, scratch_parent)
    return verdict[1] if verdict else None


def judge_verdict(path, limits=None, scratch_parent=None):
    """Like judge(), with the kind of refusal: None, or (MEMBER | LIMIT | CORRUPT, reason)."""
    if not hasattr(tarfile, "data_filter"):
        raise Unavailable("checking tarballs needs a Python whose tarfile has extraction filters (PEP 706: 3.8.17, "
                          "3.9.17, 3.10.12, 3.11.4, 3.12 or later); this one is %s" % sys.version.split()[0])
    limits = limits or Limits()
    stored = max(1, os.path.getsize(path))
    scratch = tempfile.mkdtemp(prefix=".tarball-check-", dir=scratch_parent)
    try:
        return _judge(path, stored, limits, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _judge(path, stored, limits, scratch):
    expanded = members = 0
    try:
        with tarfile.open(path, mode="r|*") as archive:
            archive.errorlevel = 2
            for member in archive:
                members += 1
                if limits.max_members and members > limits.max_members:
                    return LIMIT, "tarball has more than %d members (the limit)" % limits.max_members
                if member.isreg():
                    expanded += member.size
                    problem = _over_limit(expanded, stored, limits)
                    if problem:
                        return LIMIT, problem
                problem = member_problem(member) or _replaces_directory(member, scratch)
                if problem:
                    return MEMBER, problem
                try:
                    _replay(archive, member, scratch)
                except tarfile.FilterError as exc:
                    return MEMBER, _filter_problem(exc)
                except (OSError, tarfile.ExtractError) as exc:
                    return MEMBER, "member %r cannot be extracted over the tarball's earlier members: %s" % (
                        member.name, getattr(exc, "strerror", None) or exc)
    except (tarfile.TarError, EOFError, OSError, ValueError, OverflowError) as exc:
        return CORRUPT, "not a readable tar archive: %s" % (getattr(exc, "strerror", None) or exc)
    return None


def _over_limit(expanded, stored, limits):
    if limits.max_expanded_bytes and expanded > limits.max_expanded_bytes:
        return "tarball expands to at least %s (%d bytes), over the limit of %s" % (
            human_bytes(expanded), expanded, human_bytes(limits.max_expanded_bytes))
    if limits.max_ratio and expanded > limits.ratio_floor_bytes and expanded > limits.max_ratio * stored:
        return "tarball expands more than %d times its size: at least %s from %s (ratio %d:1; the limit is %d:1)" % (
            limits.max_ratio, human_bytes(expanded), human_bytes(stored), expanded // stored, limits.max_ratio)
    return None
