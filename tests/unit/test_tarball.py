"""Tarball validation (_tarball.judge): the hostile cases one by one, the limits, and what is still accepted."""
import gzip
import io
import posixpath
import tarfile

import pytest

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _tarball as tb

from tarballs import build_tarball


def judge_members(tmp_path, members, compress=False, limits=None):
    path = build_tarball(tmp_path / ("t.tar.gz" if compress else "t.tar"), members, compress=compress)
    return tb.judge(str(path), limits, scratch_parent=str(tmp_path))


def test_a_plain_tree_with_inside_links_is_accepted(tmp_path):
    members = [("dir", "bin"), ("file", "bin/tool", b"#!/bin/sh\n"), ("sym", "latest", "bin"),
               ("sym", "bin/self", "../bin/tool"), ("sym", "here", "."), ("file", "latest/other", b"x"),
               ("dir", "./"), ("file", ".cvmfscatalog", b"")]
    assert judge_members(tmp_path, members, compress=True) is None


def test_symlink_chain_resolving_outside_is_refused_naming_the_member(tmp_path):
    # The first case: the link text normalises to "etc/passwd" (inside), but through b -> . it climbs out.
    chain = "b/" * 8 + "../" * 7 + "etc/passwd"
    assert posixpath.normpath(chain) == "b/etc/passwd"  # what a check of the link text alone sees
    reason = judge_members(tmp_path, [("sym", "b", "."), ("sym", "c", chain), ("file", "ok", b"fine")])
    assert reason is not None
    assert "member 'c'" in reason and "resolves outside the tarball's folder" in reason


def test_write_through_an_escaping_directory_link_is_refused(tmp_path):
    # The second case: d resolves above the folder; the regular file d/x would be written there.
    reason = judge_members(tmp_path, [("sym", "b", "."), ("sym", "d", "b/b/b/b/../../.."), ("file", "d/x", b"x")])
    assert reason is not None
    assert "member 'd'" in reason and "outside" in reason


def test_file_written_through_a_link_made_earlier_is_refused(tmp_path):
    # Every link text is harmless, and each link resolves inside when it is made; then p/q is replaced, so that
    # "up" now leads one level above the folder, and the file up/x would be written there.
    reason = judge_members(tmp_path, [("dir", "p"), ("sym", "p/q", "."), ("sym", "up", "p/q/.."),
                                      ("sym", "p/q", ".."), ("file", "up/x", b"x")])
    assert reason == ("member 'up/x' would be written outside the tarball's folder (through a symbolic link the "
                      "tarball made earlier)")


@pytest.mark.parametrize("members, expected", [
    ([("file", "/etc/cron.d/x", b"x")], "member '/etc/cron.d/x' has an absolute name"),
    ([("file", "../x", b"x")], "member '../x' has a '..' path segment"),
    ([("file", "a/../../x", b"x")], "member 'a/../../x' has a '..' path segment"),
    ([("file", "x", b"x"), ("hard", "y", "x")], "member 'y' is a hard link (to 'x')"),
    ([("sym", "y", "/etc/passwd")], "member 'y' is a symbolic link to the absolute path '/etc/passwd'"),
    ([("sym", "y", "../outside")], "member 'y' is a symbolic link to '../outside', which resolves outside"),
    ([("chr", "dev/null", "")], "member 'dev/null' is a device file, FIFO or other special file"),
    ([("fifo", "pipe", "")], "member 'pipe' is a device file, FIFO or other special file"),
    ([("file", "a/.wh.b", b"")], "member 'a/.wh.b' has an overlay whiteout name '.wh.b'"),
    ([("file", ".wh..wh..opq", b"")], "member '.wh..wh..opq' has an overlay whiteout name"),
    ([("file", ".cvmfs/x", b"")], "member '.cvmfs/x' is under the reserved top-level directory '.cvmfs'"),
    ([("sym", ".cvmfscatalog", "x")], "member '.cvmfscatalog': '.cvmfscatalog' must be a regular file"),
    ([("file", "a\nb", b"")], "member 'a\\nb' contains a control character"),
    ([("file", "x" * 300, b"")], "has a name longer than 255 bytes"),
])
def test_hostile_members_refuse_the_whole_tarball(tmp_path, members, expected):
    reason = judge_members(tmp_path, [("file", "good", b"fine")] + members + [("file", "after", b"fine")])
    assert reason is not None and expected in reason


def test_a_link_over_a_directory_is_refused(tmp_path):
    reason = judge_members(tmp_path, [("dir", "sub"), ("file", "sub/x", b"x"), ("sym", "sub", "other")])
    assert reason == "member 'sub' would replace the directory an earlier member made"
    reason = judge_members(tmp_path, [("file", "e", b"x"), ("sym", "e/a", "a")])
    assert reason is not None and reason.startswith("member 'e/a' cannot be extracted over the tarball's earlier")


def test_a_corrupt_tarball_is_refused_as_unreadable(tmp_path):
    path = tmp_path / "broken.tar.gz"
    path.write_bytes(gzip.compress(b"this is not a tar archive at all" * 40))
    reason = tb.judge(str(path), scratch_parent=str(tmp_path))
    assert reason is not None and reason.startswith("not a readable tar archive")


def test_a_truncated_tarball_is_refused(tmp_path):
    full = build_tarball(tmp_path / "full.tar", [("file", "big", b"y" * 100000)]).read_bytes()
    path = tmp_path / "cut.tar"
    path.write_bytes(full[:30000])
    reason = tb.judge(str(path), scratch_parent=str(tmp_path))
    assert reason is not None and "not a readable tar archive" in reason


def test_expansion_ratio_limit_gives_the_figures(tmp_path):
    # The bomb, scaled down: 64 MiB of zeros compress to ~64 KB (ratio ~1000:1).
    path = tmp_path / "zeros.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=1) as archive:
        info = tarfile.TarInfo("zeros")
        info.size = 64 * tb.MIB
        archive.addfile(info, io.BytesIO(bytes(info.size)))
    reason = tb.judge(str(path), scratch_parent=str(tmp_path))
    assert reason is not None
    assert "expands more than 200 times its size" in reason and "64.0 MiB" in reason and "the limit is 200:1" in reason


def test_expanded_size_and_member_count_limits(tmp_path):
    members = [("file", "f%d" % i, b"z" * 1000) for i in range(20)]
    reason = judge_members(tmp_path, members, limits=tb.Limits(max_expanded_bytes=5000))
    assert reason == "tarball expands to at least 5.9 KiB (6000 bytes), over the limit of 4.9 KiB"
    reason = judge_members(tmp_path, members, limits=tb.Limits(max_members=10))
    assert reason == "tarball has more than 10 members (the limit)"
    assert judge_members(tmp_path, members, limits=tb.Limits(max_members=20, max_expanded_bytes=20000)) is None


def test_tiny_tarballs_are_not_refused_for_their_ratio(tmp_path):
    # A few KB of text compress far beyond 200:1 with tar's padding, yet are nowhere near a bomb.
    assert judge_members(tmp_path, [("file", "log", b"a" * 200000)], compress=True) is None


def test_limits_from_module_params():
    limits = tb.Limits.from_params({"tarball_max_ratio": 10, "tarball_max_members": None})
    assert limits.max_ratio == 10 and limits.max_members == tb.Limits().max_members
