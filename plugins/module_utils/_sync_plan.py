# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""The sync engine's pure half: which object goes where, what is refused, what changed, the state file format.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.

No I/O here (no boto3, no subprocess, no file system): ``_sync.py`` lists the bucket, downloads, stages and
applies; this file decides. Vocabulary:

- *key*: an S3 object key, e.g. ``cvmfs/sw/v1/bin/tool``; *path*: where it lands, relative to the repository
  root, e.g. ``sw/v1/bin/tool``.
- *kind*: ``file`` (the object becomes one file) or ``tarball`` (the object is ingested into a directory named
  after it without its extension: ``cvmfs/sw/v1.tar.gz`` -> directory ``sw/v1``).
- *state*: what was last published, ``{key: (etag, size, kind)}``.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import re

FILE = "file"
TARBALL = "tarball"
KINDS = (FILE, TARBALL)
# Longest first so `x.tar.gz` loses `.tar.gz`, not just `.gz`.
TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar")
STATE_FORMAT_VERSION = 1
# Files CVMFS itself creates in a repository (dirtab, auto-catalogs): a re-check without state leaves them alone.
CVMFS_MAGIC_FILES = (".cvmfscatalog", ".cvmfsautocatalog")
# Managed by CVMFS, never by a user upload.
REFUSED_NAMES = {".cvmfsautocatalog": "'.cvmfsautocatalog' is managed by CVMFS (automatic nested catalogs)"}
NAME_MAX_BYTES = 255
KEY_MAX_BYTES = 1024
PATH_MAX_BYTES = 4000
_CONTROL_CHARACTERS = re.compile(u"[\x00-\x1f\x7f-\x9f]")
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")


class Refused(ValueError):
    """A key or tar member that must not be applied; the message says why, for the operator and the uploader."""


def normalize_etag(etag):
    """S3 quotes ETags (`"abc"`); compare them unquoted and lowercase."""
    return (etag or "").strip().strip('"').lower()


def etag_is_md5(etag):
    """True when the ETag is the MD5 of the content (a single-part upload), so a local file can be checked."""
    return bool(_MD5_ETAG.match(normalize_etag(etag)))


def _utf8_length(text, what):
    if text.isascii():  # one byte a character: no encoding needed (most keys; a reconcile checks 100,000s)
        return len(text)
    try:
        return len(text.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        raise Refused("%s is not valid UTF-8 text" % what)


def has_control_character(text):
    return bool(_CONTROL_CHARACTERS.search(text))


def check_relative_path(path, what):
    """Raise Refused unless ``path`` is a plain relative path that stays where it is put."""
    if not path:
        raise Refused("%s is empty" % what)
    if _CONTROL_CHARACTERS.search(path):
        raise Refused("%s contains a control character" % what)
    if path.startswith("/"):
        raise Refused("%s is absolute" % what)
    if _utf8_length(path, what) > PATH_MAX_BYTES:
        raise Refused("%s is longer than %d bytes" % (what, PATH_MAX_BYTES))
    for segment in path.split("/"):
        if segment == "":
            raise Refused("%s has an empty path segment ('//')" % what)
        if segment in (".", ".."):
            raise Refused("%s has a '%s' path segment" % (what, segment))
        if segment.startswith(".wh."):
            raise Refused("%s has an overlay whiteout name '%s'" % (what, segment))
        if segment in REFUSED_NAMES:
            raise Refused("%s: %s" % (what, REFUSED_NAMES[segment]))
        if _utf8_length(segment, what) > NAME_MAX_BYTES:
            raise Refused("%s has a name longer than %d bytes" % (what, NAME_MAX_BYTES))
    if path.split("/", 1)[0] == ".cvmfs":
        raise Refused("%s is under the reserved top-level directory '.cvmfs'" % what)
    return path


def is_directory_marker(key, prefix):
    """`cvmfs/` itself or `cvmfs/dir/` (zero-byte "folder" objects made by S3 consoles): no content, skipped."""
    if key == prefix:
        return True
    rest = key[len(prefix):]
    return key.startswith(prefix) and rest.endswith("/") and not rest.startswith("/") and "//" not in rest


def object_path(key, prefix):
    """The repository path of ``key``; Refused when the key lies outside ``prefix`` or would escape the repository."""
    if not key.startswith(prefix):
        raise Refused("key is outside the prefix %r" % prefix)
    if _utf8_length(key, "key") > KEY_MAX_BYTES:
        raise Refused("key is longer than %d bytes (S3's limit)" % KEY_MAX_BYTES)
    return check_relative_path(key[len(prefix):], "key")


def tarball_target(path):
    """`sw/v1.tar.gz` -> `sw/v1`; None when ``path`` is not a tarball name (or is only an extension)."""
    for suffix in TARBALL_SUFFIXES:
        if path.endswith(suffix) and not path.endswith("/" + suffix) and path != suffix:
            return path[:-len(suffix)]
    return None


def classify(key, prefix, tarballs):
    """(kind, target path) of a key: a file lands at its path, a tarball's content in its target directory."""
    path = object_path(key, prefix)
    if tarballs:
        target = tarball_target(path)
        if target is not None:
            return TARBALL, target
    return FILE, path


def kind_of(key, prefix, tarballs):
    """The kind ``classify`` gives a valid key, without judging the key again."""
    return TARBALL if tarballs and tarball_target(key[len(prefix):]) is not None else FILE


def target_of(key, kind, prefix):
    """The repository path of an entry already known to be valid (from state): no re-validation."""
    path = key[len(prefix):]
    return tarball_target(path) if kind == TARBALL else path


class Observation:
    """What the bucket holds for one key now: etag None means the object is absent (deleted, or never completed)."""

    __slots__ = ("key", "etag", "size")

    def __init__(self, key, etag, size):
        self.key = key
        self.etag = normalize_etag(etag) if etag is not None else None
        self.size = size


class Change:
    """One object to apply: ``op`` is add, update (both need its content) or delete."""

    __slots__ = ("op", "key", "kind", "path", "etag", "size")

    def __init__(self, op, key, kind, path, etag=None, size=None):
        self.op, self.key, self.kind, self.path, self.etag, self.size = op, key, kind, path, etag, size

    def __repr__(self):
        return "Change(%s %s %s -> %s)" % (self.op, self.kind, self.key, self.path)


class Plan:
    """The differences between what was published (state) and the bucket, after refusing what must not go in."""

    def __init__(self, prefix=""):
        self.prefix = prefix
        self.changes = []
        self.unchanged = 0
        self.refused = []  # [{"key": ..., "reason": ...}]

    def refuse(self, key, reason, category="conflict"):
        """``category``: key (naming rules), conflict (clashing paths), or a tarball's verdict (see _refusals)."""
        self.refused.append({"key": key, "reason": reason, "category": category})

    @property
    def downloads(self):
        return [c for c in self.changes if c.op != "delete"]

    def count(self, op):
        return sum(1 for c in self.changes if c.op == op)

    def new_state(self, old_state, applied=None):
        """The state after ``applied`` changes (default: all) were published on top of ``old_state``."""
        state = dict(old_state)
        for change in self.changes if applied is None else applied:
            if change.op == "delete":
                state.pop(change.key, None)
            else:
                state[change.key] = (change.etag, change.size, change.kind)
        return state


def plan(old_state, observations, prefix, tarballs, complete):
    """Compare what the bucket holds now with ``old_state``.

    ``observations`` is an iterable of Observation (a streamed listing, or the touched keys' current state);
    ``complete`` says it covers the whole prefix, so state keys it does not mention were deleted (full mode).
    Duplicates and order do not matter: the last observation of a key wins, and every one reads real state.
    """
    result = Plan(prefix)
    seen = set()
    pending = {}
    for obs in observations:
        if is_directory_marker(obs.key, prefix):
            continue
        seen.add(obs.key)
        pending[obs.key] = obs
    refused_keys = set()
    for key in sorted(pending):
        obs = pending[key]
        old = old_state.get(key)
        if obs.etag is None:
            if old is not None:
                result.changes.append(Change("delete", key, old[2], target_of(key, old[2], prefix)))
            continue
        if old is not None and old[0] == obs.etag and old[1] == obs.size and old[2] == kind_of(key, prefix, tarballs):
            # Published as it is, as the same kind: its key was judged when it was published. Judging 100,000
            # unchanged keys again was most of a no-change reconcile's own time.
            result.unchanged += 1
            continue
        try:
            kind, path = classify(key, prefix, tarballs)
        except Refused as exc:
            result.refuse(key, str(exc), "key")
            refused_keys.add(key)
            continue
        if old is not None and old[2] != kind:
            # The tarball option was switched: remove what the old kind put there, then add anew.
            result.changes.append(Change("delete", key, old[2], target_of(key, old[2], prefix)))
            old = None
        if old is None:
            result.changes.append(Change("add", key, kind, path, obs.etag, obs.size))
        elif old[0] != obs.etag or old[1] != obs.size:
            result.changes.append(Change("update", key, kind, path, obs.etag, obs.size))
        else:
            result.unchanged += 1
    if complete:
        for key in sorted(set(old_state) - seen):
            kind = old_state[key][2]
            result.changes.append(Change("delete", key, kind, target_of(key, kind, prefix)))
    _refuse_conflicts(result, old_state, prefix)
    return result


def _ancestors(path):
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _refuse_conflicts(result, old_state, prefix):
    """Refuse changes whose path cannot coexist with another entry (a file where a directory is needed, or a
    tarball directory that would swallow other objects). What is already published keeps its place; among new
    entries the first key in sort order wins, so the outcome does not depend on listing or event order."""
    if all(c.op == "delete" for c in result.changes):
        return  # nothing is added or updated: nothing can conflict (a reconcile that finds no change ends here)
    touched = {c.key for c in result.changes}
    deleted = {c.key for c in result.changes if c.op == "delete"}
    claimed = {}  # path -> key: a file, or a tarball's whole directory
    needed_dirs = set()  # every directory some claimed path lies in

    def holder_of(path):
        if path in claimed:
            return claimed[path]
        return next((claimed[p] for p in _ancestors(path) if p in claimed), None)

    def claim(key, path):
        claimed[path] = key
        needed_dirs.update(_ancestors(path))

    for key, (_etag, _size, kind) in old_state.items():
        if key not in touched:
            claim(key, target_of(key, kind, prefix))
    kept = [c for c in result.changes if c.op == "delete"]
    for change in result.changes:
        if change.op == "delete":
            continue
        holder = holder_of(change.path)
        if holder is None and change.path not in needed_dirs:
            claim(change.key, change.path)
            kept.append(change)
            continue
        if holder is not None:
            reason = "path %r conflicts with object %r" % (change.path, holder)
        else:
            reason = "path %r is a directory holding other objects" % change.path
        result.refuse(change.key, reason)
        if change.key in old_state and change.key not in deleted:
            # A refused update leaves the published version where it is.
            old_kind = old_state[change.key][2]
            claim(change.key, target_of(change.key, old_kind, prefix))
    result.changes = kept


# --- state file -------------------------------------------------------------------------------------------

def state_identity(fqrn, bucket, prefix, tarballs):
    """What a state file must match to be trusted: another repository's or another layout's state is ignored."""
    return {"fqrn": fqrn, "bucket": bucket, "prefix": prefix, "tarballs": bool(tarballs)}


def dump_state(state, identity):
    """Serialize state compactly (one line per object) so 100,000 entries stay a few MB."""
    header = '{"version": %d, "identity": %s, "objects": {'
    lines = [header % (STATE_FORMAT_VERSION, json.dumps(identity, sort_keys=True))]
    items = sorted(state.items())
    for index, (key, (etag, size, kind)) in enumerate(items):
        sep = "," if index < len(items) - 1 else ""
        lines.append("%s: %s%s" % (json.dumps(key), json.dumps([etag, size, kind]), sep))
    lines.append("}}")
    return "\n".join(lines) + "\n"


def load_state(text, identity):
    """(state, None) from a state file's text, or (None, reason) when it cannot be trusted."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        return None, "state file is not valid JSON (%s)" % exc
    if not isinstance(data, dict) or data.get("version") != STATE_FORMAT_VERSION:
        return None, "state file has an unknown format version"
    if data.get("identity") != identity:
        return None, "state file belongs to another repository, bucket, prefix or tarball setting"
    objects = data.get("objects")
    if not isinstance(objects, dict):
        return None, "state file has no object table"
    state = {}
    for key, value in objects.items():
        if (not isinstance(value, list) or len(value) != 3 or not isinstance(value[0], str)
                or not isinstance(value[1], int) or value[2] not in KINDS):
            return None, "state file has a malformed entry for %r" % key
        state[key] = (value[0], value[1], value[2])
    return state, None
