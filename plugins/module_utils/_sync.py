# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""The sync engine's I/O half: mirror ``s3://<bucket>/<prefix>`` into ``/cvmfs/<fqrn>``.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.

One run, in order (``_sync_plan.py`` makes every decision):

1. read what the bucket holds: the touched keys (HeadObject, ``changes`` mode) or the whole prefix
   (ListObjectsV2, ``full`` mode), and the state of the last publish;
2. plan the differences;
3. download new and changed objects, in parallel and streamed, into a private staging folder; check tarballs'
   members there. Nothing in the repository has changed yet, and no transaction is open;
4. one transaction for plain files and deletions: apply from staging (renames or local copies), publish;
5. one ``cvmfs_server ingest`` per new or changed tarball (ingest opens its own transaction, so it cannot share
   the one of step 4). Step 4 goes first because it creates the parent directories that a gateway lease on a
   tarball's directory needs, and removes the directories of deleted tarballs. Each step is atomic on its own:
   a failure aborts that step and leaves every earlier revision as published.

The state file is rewritten after each successful publish; a marker file says "publishing, state not yet
recorded" so that a crash in that window leads to a full re-check instead of trusting an old state.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import functools
import hashlib
import os
import random
import re
import shutil
import stat
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from xml.etree import ElementTree

try:
    from urllib.parse import quote, unquote_plus, urlencode
except ImportError:  # pragma: no cover - Python 2 module machinery only
    from urllib import quote, unquote_plus, urlencode  # noqa

try:
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.exceptions import BotoCoreError, ClientError
except ImportError:  # _rgw.require_boto3 reports it; these stand-ins only keep the except clauses valid
    class BotoCoreError(Exception):
        pass

    class ClientError(Exception):
        pass

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _cvmfs as cvmfs
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _naming as naming
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _rgw as rgw
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _sync_plan as sp
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._module import PublisherError

SYNC_ARGSPEC = dict(
    repository=dict(type="str", required=True, aliases=["fqrn", "name"]),
    bucket=dict(type="str"),
    prefix=dict(type="str", default=naming.DEFAULT_PREFIX),
    mode=dict(type="str", choices=["changes", "full"], default="full"),
    keys=dict(type="list", elements="str", default=[], no_log=False),
    tarballs=dict(type="bool", default=True),
    concurrency=dict(type="int", default=16),
    state_dir=dict(type="path"),
    staging_dir=dict(type="path"),
    abort_stale_transaction=dict(type="bool", default=True),
    transaction_retries=dict(type="int", default=5),
    max_reported_paths=dict(type="int", default=100),
)
DEFAULT_STATE_DIR = "/var/lib/cvmfs-publisher/state"
DEFAULT_STAGING_DIR = "/var/spool/cvmfs-publisher/staging"
CHUNK_BYTES = 1 << 20
# cvmfs_server exit codes worth another attempt: a lease held by another publisher, a transaction just opened.
RETRYABLE_RCS = (cvmfs.RC_LEASE_BUSY, cvmfs.RC_ALREADY_IN_TRANSACTION)
_REVISION_IN_OUTPUT = re.compile(r"\brevision (\d+)\b")


class SyncError(PublisherError):
    """A sync that stopped; ``details`` say how far it got (what was published before the failure)."""


class ObjectGone(Exception):
    """The object disappeared between listing and download (or was an incomplete multipart upload)."""


# ---------------------------------------------------------------------------------------------------------------
# Reading the bucket


def _not_found(exc):
    return rgw.error_status(exc) == 404 or rgw.error_code(exc) in ("404", "NoSuchKey", "NotFound")


# Listing and downloading skip boto3's response parsing: botocore's generic XML parser spends ~1 s of CPU per
# 1,000-key ListObjectsV2 page and ~2 ms per GetObject, which made the engine CPU-bound on small objects. The
# requests are still signed by the client's own credentials (static or AssumeRole) and sent on its HTTP session
# (same endpoint, TLS settings and connection pool); errors become ClientErrors so messages and retries stay those
# of _rgw.

_S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def _object_url(s3, bucket, key=None, query=None):
    url = "%s/%s" % (s3.meta.endpoint_url.rstrip("/"), quote(bucket, safe=""))
    if key is not None:
        url += "/" + quote(key, safe="/~")
    if query:
        url += "?" + urlencode(sorted(query.items()), quote_via=quote)
    return url


def _send_signed(s3, url, operation, stream=False):
    """A signed GET on the client's HTTP session; raises ClientError (parsed from RGW's XML) on HTTP errors."""
    request = AWSRequest(method="GET", url=url, stream_output=stream)
    credentials = s3._request_signer._credentials.get_frozen_credentials()
    S3SigV4Auth(credentials, "s3", s3.meta.region_name).add_auth(request)
    response = s3._endpoint.http_session.send(request.prepare())
    if response.status_code >= 300:
        if stream:
            response.raw.close()
        raise rgw._client_error_from_http(response, operation)
    return response


@rgw.jittered_backoff(retries=4, delay=0.5)
def _list_page(s3, bucket, prefix, token):
    query = {"list-type": "2", "prefix": prefix, "encoding-type": "url", "max-keys": "1000"}
    if token:
        query["continuation-token"] = token
    return ElementTree.fromstring(_send_signed(s3, _object_url(s3, bucket, query=query), "ListObjectsV2").content)


def list_prefix(s3, bucket, prefix):
    """Every object under ``prefix``, streamed page by page (1,000 keys a page) as Observations."""
    token = None
    while True:
        try:
            page = _list_page(s3, bucket, prefix, token)
        except (BotoCoreError, ClientError) as exc:
            raise SyncError(rgw.describe_client_error(exc, "list s3://%s/%s" % (bucket, prefix)))
        except ElementTree.ParseError as exc:
            raise SyncError("RGW answered the listing of s3://%s/%s with malformed XML: %s" % (bucket, prefix, exc))
        for item in page.iter(_S3_NS + "Contents"):
            yield sp.Observation(unquote_plus(item.findtext(_S3_NS + "Key")), item.findtext(_S3_NS + "ETag"),
                                 int(item.findtext(_S3_NS + "Size")))
        token = page.findtext(_S3_NS + "NextContinuationToken")
        if page.findtext(_S3_NS + "IsTruncated") != "true" or not token:
            return


def head_keys(s3, bucket, keys, prefix, concurrency):
    """The current state of each touched key (absent ones with etag None), read in parallel.

    Keys the plan will refuse anyway are not asked about (they get a placeholder observation).
    """
    def head(key):
        try:
            sp.object_path(key, prefix)
        except sp.Refused:
            return sp.Observation(key, "", 0)
        try:
            reply = s3.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _not_found(exc):
                return sp.Observation(key, None, None)
            raise SyncError(rgw.describe_client_error(exc, "read s3://%s/%s" % (bucket, key)), key=key)
        except BotoCoreError as exc:
            raise SyncError(rgw.describe_client_error(exc, "read s3://%s/%s" % (bucket, key)), key=key)
        return sp.Observation(key, reply["ETag"], reply["ContentLength"])

    unique = sorted(set(keys))
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(unique) or 1))) as pool:
        return list(pool.map(head, unique))


# ---------------------------------------------------------------------------------------------------------------
# Downloading into staging


@rgw.jittered_backoff(retries=4, delay=0.5)
def _get(s3, bucket, key):
    return _send_signed(s3, _object_url(s3, bucket, key), "GetObject", stream=True)


def download(s3, bucket, change, folder):
    """Stream one object into ``folder``; updates change.etag/size to what was actually read (the object may have
    been replaced since it was listed). Raises ObjectGone on 404, SyncError on other errors or a bad checksum."""
    action = "download s3://%s/%s" % (bucket, change.key)
    try:
        response = _get(s3, bucket, change.key)
    except ClientError as exc:
        if _not_found(exc):
            raise ObjectGone(change.key)
        raise SyncError(rgw.describe_client_error(exc, action), key=change.key)
    except BotoCoreError as exc:
        raise SyncError(rgw.describe_client_error(exc, action), key=change.key)
    fd, path = tempfile.mkstemp(dir=folder, prefix="obj-")
    digest = hashlib.md5()
    size = 0
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as handle:
            for chunk in iter(lambda: response.raw.read(CHUNK_BYTES), b""):
                digest.update(chunk)
                handle.write(chunk)
                size += len(chunk)
        response.raw.release_conn()
    except BaseException as exc:
        response.raw.close()
        os.unlink(path)
        if isinstance(exc, (OSError, BotoCoreError)) or type(exc).__module__.startswith("urllib3"):
            raise SyncError("%s: %s" % (action, exc), key=change.key)
        raise
    etag = sp.normalize_etag(response.headers.get("ETag"))
    announced = response.headers.get("Content-Length")
    if (announced is not None and int(announced) != size) or (sp.etag_is_md5(etag) and digest.hexdigest() != etag):
        os.unlink(path)
        raise SyncError("download of s3://%s/%s was corrupted: got %d bytes with MD5 %s, RGW announced %s bytes "
                        "with ETag %s" % (bucket, change.key, size, digest.hexdigest(), announced, etag),
                        key=change.key)
    change.etag, change.size = etag, size
    return path


def tarball_problems(path):
    """Reasons to refuse a staged tarball (members escaping its directory), or a list with the read error."""
    problems = []
    try:
        with tarfile.open(path, mode="r|*") as archive:
            for member in archive:
                problem = sp.tar_member_problem(member.name, member.isreg(), member.isdir(), member.issym(),
                                                member.islnk(), member.linkname)
                if problem:
                    problems.append(problem)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        problems.append("not a readable tar archive: %s" % exc)
    return problems


def stage(s3, bucket, plan, folder, concurrency, old_state):
    """Download every add/update of ``plan`` into ``folder``. Returns ({key: staged path}, bytes downloaded).

    An object gone since it was listed becomes a deletion (or nothing, if it was never published); a tarball
    with an escaping member is refused and keeps its previous version. The plan is edited in place.
    """
    wanted = plan.downloads
    staged, gone = {}, set()

    def fetch(change):
        try:
            return change, download(s3, bucket, change, folder)
        except ObjectGone:
            return change, None

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for change, path in pool.map(fetch, wanted):
            if path is None:
                gone.add(change.key)
            else:
                staged[change.key] = path
    kept = []
    for change in plan.changes:
        if change.key in gone and change.op != "delete":
            if change.key in old_state:
                kind = old_state[change.key][2]
                kept.append(sp.Change("delete", change.key, kind, sp.target_of(change.key, kind, plan.prefix)))
            continue
        if change.op != "delete" and change.kind == sp.TARBALL:
            problems = tarball_problems(staged[change.key])
            if problems:
                plan.refuse(change.key, "tarball refused, nothing of it published: %s" % "; ".join(problems[:5]))
                continue
        kept.append(change)
    # Deletions first, as the plan orders them.
    plan.changes = [c for c in kept if c.op == "delete"] + [c for c in kept if c.op != "delete"]
    downloaded = sum(os.path.getsize(p) for p in staged.values())
    return staged, downloaded


# ---------------------------------------------------------------------------------------------------------------
# Rebuilding lost state from the published tree


def md5_of(path):
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_from_published(union, listing, prefix, tarballs):
    """A state describing what ``union`` (the published tree) holds, trusting only what can be verified:
    a file counts as the listed object when its size matches and, for single-part uploads, its MD5 too.
    Anything else gets an etag that matches nothing, so it is re-downloaded or deleted. Tarball directories
    (of listed tarballs) are left out: their tarballs are re-ingested, replacing them."""
    tarball_dirs = set()
    for key in listing:
        try:
            kind, target = sp.classify(key, prefix, tarballs)
        except sp.Refused:
            continue
        if kind == sp.TARBALL:
            tarball_dirs.add(target)
    state = {}
    for folder, dirs, files in os.walk(union):
        rel_dir = os.path.relpath(folder, union).replace(os.sep, "/")
        rel_dir = "" if rel_dir == "." else rel_dir
        if rel_dir == "":
            dirs[:] = [d for d in dirs if d != ".cvmfs"]
        dirs[:] = [d for d in dirs if (rel_dir + "/" + d if rel_dir else d) not in tarball_dirs]
        for name in files:
            rel = rel_dir + "/" + name if rel_dir else name
            if name in sp.CVMFS_MAGIC_FILES and prefix + rel not in listing:
                continue
            path = os.path.join(folder, name)
            info = os.lstat(path)
            key = prefix + rel
            etag = "unverified"
            listed = listing.get(key)
            if (listed and stat.S_ISREG(info.st_mode) and listed.size == info.st_size
                    and sp.etag_is_md5(listed.etag) and md5_of(path) == listed.etag):
                etag = listed.etag
            state[key] = (etag, info.st_size, sp.FILE)
    return state


# ---------------------------------------------------------------------------------------------------------------
# State file


class StateStore:
    """``<state_dir>/<fqrn>.json`` plus its ``.publishing`` marker."""

    def __init__(self, state_dir, fqrn, identity):
        self.path = os.path.join(state_dir, fqrn + ".json")
        self.marker = self.path + ".publishing"
        self.identity = identity

    def load(self):
        """(state, None) or (None, why it cannot be trusted)."""
        if os.path.exists(self.marker):
            return None, "a previous sync stopped between publishing and recording its state"
        try:
            with open(self.path, "r") as handle:
                text = handle.read()
        except FileNotFoundError:
            return None, "no state file yet (%s)" % self.path
        except (IOError, OSError) as exc:
            return None, "cannot read state file %s: %s" % (self.path, exc.strerror or exc)
        return sp.load_state(text, self.identity)

    def publishing(self):
        self._write(self.marker, "publishing\n")

    def save(self, state):
        self._write(self.path, sp.dump_state(state, self.identity))
        self.done()

    def done(self):
        try:
            os.unlink(self.marker)
        except FileNotFoundError:
            pass

    def _write(self, path, text):
        folder = os.path.dirname(path)
        try:
            os.makedirs(folder, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".")
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.rename(temp, path)
        except (IOError, OSError) as exc:
            raise SyncError("cannot write sync state %s: %s" % (path, exc.strerror or exc))


# ---------------------------------------------------------------------------------------------------------------
# Applying inside a transaction


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _place(staged, target):
    """Move a staged file into the union dir (a rename when on the same file system, else a local copy)."""
    if os.path.isdir(target) and not os.path.islink(target):
        os.rmdir(target)  # only an emptied directory may be replaced by a file; rmdir refuses anything else
    try:
        os.replace(staged, target)
    except OSError as exc:
        if exc.errno != 18:  # EXDEV: the union dir is another file system (OverlayFS in production)
            raise
        shutil.copyfile(staged, target)
        os.chmod(target, 0o644)


def _prune_empty_dirs(union, rel_dirs):
    """Remove directories emptied by deletions, deepest first, up to (not including) the repository root."""
    for rel in sorted(rel_dirs, key=lambda p: p.count("/"), reverse=True):
        while rel:
            path = os.path.join(union, rel)
            try:
                os.rmdir(path)
            except OSError:
                break  # not empty, or already gone
            rel = rel.rpartition("/")[0]


def apply_plain(union, changes, staged, tarball_parents):
    """Deletions, then files, then the parent folders tarballs need; raises ApplyError naming the object."""
    emptied = set()
    for change in changes:
        if change.op == "delete":
            with _naming_object(change):
                _remove(os.path.join(union, change.path))
                emptied.add(change.path.rpartition("/")[0])
    for change in changes:
        if change.op != "delete" and change.kind == sp.FILE:
            with _naming_object(change):
                target = os.path.join(union, change.path)
                parent = os.path.dirname(target)
                if not os.path.isdir(parent):
                    os.makedirs(parent)
                _place(staged[change.key], target)
    _prune_empty_dirs(union, emptied - {""})
    for rel in tarball_parents:
        os.makedirs(os.path.join(union, rel), exist_ok=True)


class ApplyError(Exception):
    def __init__(self, change, reason):
        super(ApplyError, self).__init__("%s %s -> /%s: %s" % (change.op, change.key, change.path, reason))
        self.change = change
        self.reason = reason


class _naming_object:
    """Turn an OSError while applying one change into an ApplyError that names the object."""

    def __init__(self, change):
        self.change = change

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, OSError):
            raise ApplyError(self.change, exc.strerror or str(exc))
        return False


# ---------------------------------------------------------------------------------------------------------------
# cvmfs_server steps


def with_busy_retries(func, retries, sleep=time.sleep, what="open a transaction"):
    """Call ``func``; on cvmfs_server exit code 16 (lease busy) or 17 (already in a transaction) retry with
    jittered exponential backoff, then fail with a message that says what was going on."""
    for attempt in range(retries + 1):
        try:
            return func()
        except cvmfs.CvmfsCommandError as exc:
            if exc.rc not in RETRYABLE_RCS:
                raise
            if attempt >= retries:
                why = ("its lease path is busy (another publisher holds an overlapping lease)"
                       if exc.rc == cvmfs.RC_LEASE_BUSY else "another transaction is open on it")
                raise SyncError("cannot %s: %s; gave up after %d attempts (exit code %d): %s"
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
    except cvmfs.CvmfsCommandError as exc:
        if exc.rc != cvmfs.RC_NOT_IN_TRANSACTION:
            return exc.msg
    return None


def _failure(fqrn, what, reason, server, progress):
    abort_error = abort_quietly(server, fqrn)
    if abort_error:
        tail = "; abort -f failed too, the repository may still be in a transaction: %s" % abort_error
    else:
        tail = "; the transaction was aborted, what was published before is intact"
    return SyncError("sync of %s failed while %s: %s%s" % (fqrn, what, reason, tail), **progress)


# ---------------------------------------------------------------------------------------------------------------
# The whole run


def _paths(changes, op, limit):
    return [c.path for c in changes if c.op == op][:limit]


def _default_under_root(params, path):
    return cvmfs.rooted(params.get("cvmfs_root") or "", path)


def sync(params, check_mode=False, s3=None, server=None):
    """Mirror the bucket into the repository; returns the module result (see the module's RETURN)."""
    fqrn = params["repository"]
    try:
        naming.validate_fqrn(fqrn)
        bucket = params.get("bucket") or naming.bucket_name(fqrn)
    except naming.InvalidName as exc:
        raise SyncError(str(exc))
    prefix = params["prefix"]
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    tarballs = params["tarballs"]
    concurrency = max(1, params["concurrency"])
    limit = params["max_reported_paths"]
    server = server or cvmfs.CvmfsServer.from_params(params)
    if server.read_config(fqrn) is None:
        raise SyncError("repository %s does not exist on this publisher (create it with the cvmfs_repository "
                        "module or playbooks/provision_repository.yml)" % fqrn)
    union = server.union_dir(fqrn)
    store = StateStore(params.get("state_dir") or _default_under_root(params, DEFAULT_STATE_DIR), fqrn,
                       sp.state_identity(fqrn, bucket, prefix, tarballs))
    result = dict(changed=False, repository=fqrn, bucket=bucket, prefix=prefix, requested_mode=params["mode"],
                  stale_transaction_aborted=False, revision=None, revisions=[], bytes_downloaded=0,
                  objects_downloaded=0, durations={})
    timer = time.monotonic()

    if server.in_transaction(fqrn):
        if not params["abort_stale_transaction"]:
            raise SyncError("repository %s is already in a transaction (left by a crash or held by another "
                            "publisher); abort it with 'cvmfs_server abort -f %s' or set abort_stale_transaction"
                            % (fqrn, fqrn))
        result["stale_transaction_aborted"] = True
        if not check_mode:
            error = abort_quietly(server, fqrn)
            if error:
                raise SyncError("cannot abort the stale transaction of %s: %s" % (fqrn, error))
            result["changed"] = True

    s3 = s3 or rgw.connect(params, "s3", max_pool_connections=concurrency)
    old_state, why = store.load()
    if old_state is not None and params["mode"] == "changes":
        result["mode"] = "changes"
        observations = head_keys(s3, bucket, params["keys"], prefix, concurrency)
        plan = sp.plan(old_state, observations, prefix, tarballs, complete=False)
    elif old_state is not None:
        result["mode"] = "full"
        plan = sp.plan(old_state, list_prefix(s3, bucket, prefix), prefix, tarballs, complete=True)
    else:
        # No trustworthy state: compare the whole bucket with what is published (costs a re-check, never a
        # wrong repository).
        result["mode"] = "full"
        result["state_rebuilt"] = why
        listing = {}
        for obs in list_prefix(s3, bucket, prefix):
            listing[obs.key] = obs
        old_state = state_from_published(union, listing, prefix, tarballs)
        plan = sp.plan(old_state, listing.values(), prefix, tarballs, complete=True)
        del listing
    result["durations"]["plan"] = round(time.monotonic() - timer, 3)

    def report():
        result.update(
            added=plan.count("add"), updated=plan.count("update"), deleted=plan.count("delete"),
            unchanged=plan.unchanged, refused=len(plan.refused), refused_objects=plan.refused[:limit],
            paths=dict(added=_paths(plan.changes, "add", limit), updated=_paths(plan.changes, "update", limit),
                       deleted=_paths(plan.changes, "delete", limit)))
        return result

    if check_mode:
        result["changed"] = result["changed"] or bool(plan.changes)
        return report()

    staging_root = params.get("staging_dir") or _default_under_root(params, DEFAULT_STAGING_DIR)
    try:
        os.makedirs(staging_root, exist_ok=True)
        # One sync per repository at a time: folders of this repository left here come from killed runs.
        for name in os.listdir(staging_root):
            if name.startswith(fqrn + "@"):
                shutil.rmtree(os.path.join(staging_root, name), ignore_errors=True)
        folder = tempfile.mkdtemp(dir=staging_root, prefix=fqrn + "@")  # "@" never occurs in a fqrn
    except (IOError, OSError) as exc:
        raise SyncError("cannot create a staging folder in %s: %s" % (staging_root, exc.strerror or exc))
    try:
        timer = time.monotonic()
        staged, result["bytes_downloaded"] = stage(s3, bucket, plan, folder, concurrency, old_state)
        result["objects_downloaded"] = len(staged)
        result["durations"]["download"] = round(time.monotonic() - timer, 3)
        report()
        timer = time.monotonic()
        _publish(server, fqrn, union, plan, staged, old_state, store, result, params["transaction_retries"])
        result["durations"]["transaction"] = round(time.monotonic() - timer, 3)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return report()


def _publish(server, fqrn, union, plan, staged, old_state, store, result, retries):
    """Steps 4 and 5 of the module docstring; the state is saved after each publish."""
    plain = [c for c in plan.changes if c.op == "delete" or c.kind == sp.FILE]
    ingests = [c for c in plan.changes if c.op != "delete" and c.kind == sp.TARBALL]
    tarball_parents = sorted({c.path.rpartition("/")[0] for c in ingests} - {""})
    missing_parents = [p for p in tarball_parents if not os.path.isdir(os.path.join(union, p))]
    state = dict(old_state)
    if not plain and not missing_parents and not ingests:
        if result.get("state_rebuilt"):
            store.save(plan.new_state(state))  # the re-check verified everything: remember it
        return

    def progress():
        return dict(revisions=list(result["revisions"]), published_changes=result.get("published_changes", 0))

    if plain or missing_parents:
        store.publishing()  # before the transaction: a failure to write it must not leave one open
        try:
            with_busy_retries(lambda: server.transaction(fqrn), retries)
        except BaseException:
            store.done()
            raise
        result["changed"] = True
        try:
            apply_plain(union, plain, staged, missing_parents)
        except ApplyError as exc:
            store.done()
            raise _failure(fqrn, "applying %s (/%s)" % (exc.change.key, exc.change.path), exc.reason, server,
                           dict(progress(), key=exc.change.key))
        except BaseException as exc:
            store.done()
            raise _failure(fqrn, "applying changes", "%s: %s" % (type(exc).__name__, exc), server, progress())
        try:
            output = server.publish(fqrn)[1]
        except PublisherError as exc:
            store.done()
            raise _failure(fqrn, "publishing", exc.msg, server, progress())
        state = plan.new_state(state, plain)
        store.save(state)
        _published(server, fqrn, output, result, len(plain))

    for change in ingests:
        exists = os.path.isdir(os.path.join(union, change.path))
        store.publishing()
        result["changed"] = True
        try:
            output = with_busy_retries(
                functools.partial(server.ingest, fqrn, staged[change.key], change.path,
                                  change.path if exists else None),
                retries, what="ingest %s" % change.key)[1]
        except PublisherError as exc:
            store.done()
            raise _failure(fqrn, "ingesting tarball %s into /%s" % (change.key, change.path), exc.msg, server,
                           dict(progress(), key=change.key))
        state = plan.new_state(state, [change])
        store.save(state)
        _published(server, fqrn, output, result, 1)


def _published(server, fqrn, output, result, count):
    revision = published_revision(server, fqrn, output)
    result["revision"] = revision
    result["revisions"].append(revision)
    result["published_changes"] = result.get("published_changes", 0) + count
