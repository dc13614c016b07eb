"""Property-based tests over generated hostile inputs (hypothesis).

- Tarballs with random graphs of symbolic links, hard links, directories, files and special files, with link
  targets made of `..`, `.`, absolute parts and names of other members: whatever ``_tarball.judge`` accepts, a real
  extraction with the standard library's "data" filter extracts without complaint, and every extracted entry
  resolves inside the folder (no hard link, no special file, nothing reachable outside).
- Object keys (generated from hostile segments and random text): a key the module accepts lands inside the
  repository, and the daemon's rules (consumer/messages.py) give exactly the same verdict as the module's.

Each run tries at least 1,000 generated inputs (the counts are printed at the end of the module).
"""
import os
import posixpath
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _sync_plan as sp
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _tarball as tb
from cvmfs_publisher_consumer import messages

from tarballs import tarball_bytes

TARBALL_EXAMPLES = 600
KEY_EXAMPLES = 500
COUNTS = {"tarballs tried": 0, "tarballs refused": 0, "keys tried": 0, "keys refused": 0}

# --- generated tarballs -----------------------------------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "c", "d", "e", "x"])
LINK_PARTS = st.sampled_from(["a", "b", "c", "d", "x", "..", ".", "etc", "passwd"])


@st.composite
def member_names(draw):
    parts = draw(st.lists(NAMES, min_size=1, max_size=4))
    name = "/".join(parts)
    if draw(st.integers(0, 30)) == 0:
        name = draw(st.sampled_from(["/", "./", "../", "a/../"])) + name
    return name


@st.composite
def link_targets(draw):
    target = "/".join(draw(st.lists(LINK_PARTS, min_size=1, max_size=10)))
    if draw(st.integers(0, 20)) == 0:
        target = "/" + target
    return target


@st.composite
def members(draw):
    kind = draw(st.sampled_from(["file", "file", "dir", "sym", "sym", "sym", "hard", "fifo"]))
    name = draw(member_names())
    if kind in ("sym", "hard"):
        return (kind, name, draw(link_targets()))
    return (kind, name, b"content of " + name.encode())


TARBALLS = st.lists(members(), min_size=1, max_size=12)


def _extracted_entries_stay_inside(root):
    real_root = os.path.realpath(root)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            assert not (os.path.isfile(path) and not os.path.islink(path) and info.st_nlink > 1), path
            resolved = os.path.realpath(path)
            assert os.path.commonpath([resolved, real_root]) == real_root, (path, resolved)
            if os.path.islink(path):
                target = os.readlink(path)
                assert not target.startswith("/"), (path, target)


@settings(max_examples=TARBALL_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=TARBALLS)
def test_accepted_tarballs_never_resolve_outside_their_folder(tmp_path_factory, entries):
    work = tmp_path_factory.mktemp("tar")
    path = work / "t.tar"
    path.write_bytes(tarball_bytes(entries))
    reason = tb.judge(str(path), scratch_parent=str(work))
    COUNTS["tarballs tried"] += 1
    if reason is not None:
        COUNTS["tarballs refused"] += 1
        assert reason.startswith(("member ", "tarball ")), reason
        return
    # Accepted: a real extraction (content included) with the stdlib filter must succeed and stay inside.
    root = work / "folder"
    root.mkdir()
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            assert not member.islnk() and (member.isreg() or member.isdir() or member.issym()), member.name
        archive.extractall(root, filter="data")
    _extracted_entries_stay_inside(str(root))


# --- generated keys ---------------------------------------------------------------------------------------------

PREFIX = "cvmfs/"
HOSTILE_SEGMENTS = st.sampled_from([
    "..", ".", "", ".cvmfs", ".wh.x", ".wh..wh..opq", ".cvmfsautocatalog", "a\ud800b", "\udcff", ".cvmfscatalog",
    "a\x00b", "a\nb", "a\x85b", "é" * 130, "x" * 256, "x" * 255, "ok", "sw", "v1.tar.gz", " ", "~", "%2e%2e", "a+b"])


@st.composite
def object_keys(draw):
    segments = draw(st.lists(st.one_of(HOSTILE_SEGMENTS, st.text(max_size=12)), min_size=1, max_size=6))
    key = "/".join(segments)
    start = draw(st.sampled_from([PREFIX, PREFIX, PREFIX + "/", "", "cvmfs", "other/"]))
    if draw(st.integers(0, 40)) == 0:
        key = key * 300  # past S3's and PATH_MAX's lengths
    return start + key


def _module_verdict(key):
    try:
        return True, sp.object_path(key, PREFIX)
    except sp.Refused:
        return False, None


def _daemon_verdict(key):
    try:
        return True, messages.check_key(key, PREFIX)
    except messages.MessageError:
        return False, None


@settings(max_examples=KEY_EXAMPLES, deadline=None)
@given(key=object_keys())
def test_daemon_and_module_agree_on_every_key_and_accepted_keys_stay_inside(key):
    COUNTS["keys tried"] += 1
    module_ok, path = _module_verdict(key)
    daemon_ok, daemon_path = _daemon_verdict(key)
    assert module_ok == daemon_ok, (key, module_ok, daemon_ok)
    if not module_ok:
        COUNTS["keys refused"] += 1
        return
    assert path == daemon_path
    for tarballs in (True, False):   # the reconcile's shortcut for unchanged keys (plan) gives them the same kind
        assert sp.kind_of(key, PREFIX, tarballs) == sp.classify(key, PREFIX, tarballs)[0], (key, tarballs)
    landed = posixpath.normpath(posixpath.join("/cvmfs/repo.example.org", path))
    assert landed.startswith("/cvmfs/repo.example.org/"), (key, landed)
    assert path.split("/")[0] != ".cvmfs" and not any(s.startswith(".wh.") for s in path.split("/"))


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    """Hand the counts to tests/conftest.py's terminal summary ("hostile inputs: ...")."""
    yield
    request.config.hostile_input_counts = dict(COUNTS)
