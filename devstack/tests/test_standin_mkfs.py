"""mkfs, rmfs, list of the stand-in; each test names the contract row (cvmfs-server-contract.md) it covers."""

import os
import pwd
import stat
import subprocess

import pytest
from harness import FQRN, OWNER, SCRIPT, Publisher, make_keys, standin


def test_mkfs_creates_config_keys_spool_union_and_revision_0(pub):
    server = standin.read_conf(os.path.join(pub.config, "server.conf"))
    assert server["CVMFS_REPOSITORY_NAME"] == FQRN
    assert server["CVMFS_REPOSITORY_TYPE"] == "stratum0"
    assert server["CVMFS_USER"] == OWNER
    assert server["CVMFS_UNION_DIR"] == f"/cvmfs/{FQRN}"
    assert server["CVMFS_SPOOL_DIR"] == f"/var/spool/cvmfs/{FQRN}"
    assert server["CVMFS_STRATUM0"] == f"http://127.0.0.1/cvmfs/{FQRN}"
    assert server["CVMFS_UPSTREAM_STORAGE"] == "gw,/srv/cvmfs/txn,http://127.0.0.1:4929/api/v1"
    assert server["CVMFS_HASH_ALGORITHM"] == "sha1"
    client = standin.read_conf(os.path.join(pub.config, "client.conf"))
    assert client["CVMFS_PUBLIC_KEY"] == f"/etc/cvmfs/keys/{FQRN}.pub"
    modes = {s: stat.S_IMODE(os.stat(os.path.join(pub.keys, FQRN + s)).st_mode) for s in (".crt", ".pub", ".gw")}
    assert modes == {".crt": 0o444, ".pub": 0o444, ".gw": 0o400}
    assert os.path.isdir(pub.union) and os.listdir(pub.union) == []
    assert os.path.isdir(pub.spool) and not pub.in_transaction()
    assert pub.revision() == 0 and pub.tree() == {}
    assert pub.mounted_revision() == 0
    assert pub.ok("list") == f"{FQRN} (stratum0 / gw)\n"


def test_mkfs_refuses_an_existing_repository(pub):
    result = pub.mkfs()
    assert result.returncode == 1
    assert f"The repository {FQRN} already exists" in result.stderr.decode()


@pytest.mark.parametrize("name", ["_underscore-first", ".dot-first", "a" * 61, "has/slash", "has space", ""])
def test_mkfs_refuses_invalid_names(tmp_path, name):
    publisher = Publisher(tmp_path)
    result = publisher.mkfs(fqrn=name, key_dir=make_keys(tmp_path / "keys", name.replace("/", "_") or "x"))
    assert result.returncode == 1
    assert "invalid repository name" in result.stderr.decode()


@pytest.mark.parametrize("upstream", ["gw,/srv/txn", "gw,/srv/txn,http://gw/api/v1,extra", "gw"])
def test_mkfs_bad_upstream_is_a_usage_error_3(tmp_path, upstream):
    """Contract: mkfs fails 3 on a bad -u (check_upstream_validity -> usage). The old stand-in said 1."""
    publisher = Publisher(tmp_path)
    result = publisher.mkfs(upstream=upstream)
    assert result.returncode == 3, result.stderr.decode()
    assert "exactly three comma-separated fields" in result.stderr.decode()
    assert publisher.ok("list") == "" and not os.path.exists(publisher.config)


def test_stricter_than_real_mkfs_refuses_a_non_gateway_upstream(tmp_path):
    """The real mkfs makes local and S3 publishers too; the stand-in only makes gateway publishers."""
    publisher = Publisher(tmp_path)
    result = publisher.mkfs(upstream="local,/srv/txn,/srv/data")
    assert result.returncode == 1
    assert "upstream type 'gw'" in result.stderr.decode()


def test_mkfs_owner_must_exist(tmp_path):
    """Contract: mkfs `-o` user must exist (check_user: "No user ...", 1), checked before anything is written."""
    publisher = Publisher(tmp_path / "root")
    result = publisher.mkfs(owner="no-such-user-standin")
    assert result.returncode == 1
    assert "No user no-such-user-standin" in result.stderr.decode()
    assert not os.path.exists(publisher.config)


def test_mkfs_key_already_installed_while_k_points_elsewhere_fails_1_even_if_identical(tmp_path):
    """Contract: mkfs 1 when any of the three keys already sits in /etc/cvmfs/keys and -k points elsewhere, even
    with identical content. The old stand-in accepted identical keys."""
    publisher = Publisher(tmp_path / "root")
    make_keys(publisher.keys, content="installed")
    os.unlink(os.path.join(publisher.keys, FQRN + ".crt"))  # one key is enough
    for content in ("installed", "different"):
        result = publisher.mkfs(key_dir=make_keys(tmp_path / content, content=content))
        assert result.returncode == 1
        assert "would overwrite keys in '/etc/cvmfs/keys'" in result.stderr.decode()
        assert not os.path.exists(publisher.config)
    make_keys(publisher.keys, content="installed")
    assert publisher.mkfs(key_dir=publisher.keys).returncode == 0  # -k naming the keys folder itself is fine


def test_mkfs_missing_key_leaves_a_half_created_repository(tmp_path):
    """Contract: mkfs writes the config before importing keys and creating the spool, so a missing key file
    (1) leaves a repository whose server.conf exists. The old stand-in checked keys first and created nothing."""
    publisher = Publisher(tmp_path / "root")
    keys = make_keys(tmp_path / "keys")
    os.unlink(os.path.join(keys, FQRN + ".gw"))
    result = publisher.mkfs(key_dir=keys)
    assert result.returncode == 1
    assert f"{FQRN}.gw is missing" in result.stderr.decode()
    assert os.path.isfile(os.path.join(publisher.config, "server.conf"))
    assert not os.path.exists(os.path.join(publisher.keys, FQRN + ".gw"))
    assert not os.path.exists(publisher.spool) and not os.path.exists(publisher.union)
    assert publisher.ok("list") == f"{FQRN} (stratum0 / gw)\n"  # listed, though unusable
    assert "already exists" in publisher.fails(1, "mkfs", "-w", "http://x", "-u", "gw,/t,http://gw", "-k", keys,
                                               "-o", OWNER, FQRN)
    assert "half-created" in publisher.fails(1, "transaction", FQRN)
    publisher.ok("rmfs", "-f", FQRN)
    assert publisher.mkfs().returncode == 0


@pytest.mark.skipif(os.getuid() != 0, reason="chown needs root")
def test_mkfs_gives_the_keys_to_the_owner_gw_0400(tmp_path):
    """Contract: `mkfs -k` imports the keys chowned to the repository owner, .gw 0400 (ssl.sh import_keychain)."""
    publisher = Publisher(tmp_path / "root")
    assert publisher.mkfs(owner="nobody").returncode == 0
    nobody = pwd.getpwnam("nobody").pw_uid
    for suffix, mode in ((".crt", 0o444), (".pub", 0o444), (".gw", 0o400)):
        info = os.stat(os.path.join(publisher.keys, FQRN + suffix))
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (nobody, mode)
    assert os.stat(publisher.union).st_uid == nobody


def test_missing_root_variable_and_help_name_the_stand_in(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CVMFS_STANDIN_ROOT"}
    result = subprocess.run([SCRIPT, "list"], env=env, capture_output=True)
    assert result.returncode == 1 and b"CVMFS_STANDIN_ROOT is not set" in result.stderr
    result = subprocess.run([SCRIPT, "--help"], env=env, capture_output=True)
    assert result.returncode == 0 and b"cvmfs_server (stand-in)" in result.stdout


def test_rmfs_keeps_keys_with_p_and_removes_everything_else(pub):
    pub.publish_files({"f": b"f"})
    gateway_repo = os.path.join(pub.root, "srv", "cvmfs-standin", "gateway", FQRN)
    assert os.path.isdir(gateway_repo)
    assert "not removing" in pub.fails(1, "rmfs", FQRN, stdin=b"n\n")
    pub.ok("rmfs", "-f", "-p", FQRN)
    assert pub.ok("list") == ""
    for path in (pub.union, pub.spool, gateway_repo):
        assert not os.path.exists(path)
    assert sorted(os.listdir(pub.keys)) == [FQRN + s for s in (".crt", ".gw", ".pub")]
    assert pub.mkfs(key_dir=pub.keys).returncode == 0  # the kept keys, imported from where they are
    pub.ok("rmfs", FQRN, stdin=b"y\n")
    assert os.listdir(pub.keys) == []
    assert "not found" in pub.fails(1, "rmfs", "-f", FQRN)


def test_rmfs_keeps_published_data_another_publisher_uses(pair):
    first, second = pair
    first.publish_files({"f": b"f"})
    first.ok("rmfs", "-f", FQRN)
    assert second.read("f") == b"f"
    second.ok("transaction", FQRN)


def test_rmfs_does_not_release_the_gateway_lease(pair):
    """Contract: rmfs removes config, spool and union dir but the gateway lease is not released: the lease of a
    transaction open at rmfs time blocks everyone (16) until it expires. The old stand-in dropped it."""
    first, second = pair
    first.ok("transaction", FQRN)
    first.ok("rmfs", "-f", FQRN)
    assert "publisher pubA holds" in second.fails(16, "transaction", FQRN)
    assert first.mkfs().returncode == 0
    assert "publisher pubA holds" in first.fails(16, "transaction", FQRN)  # this host's own leftover lease too
