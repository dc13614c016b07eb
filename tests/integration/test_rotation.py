"""Rotating the publisher's secrets without downtime, as the operator guide's "Rotating each secret" table says.

Each rotation is done with the real tool on the stack (OpenBao's AppRole API, radosgw-admin) and proven the way an
operator would see it: during the overlap both the old and the new secret work, the modules read the new one from
its file on their next run (nothing caches it), and once the old one is revoked it is refused with a clear message.
The stack's own secrets are never touched: every secret rotated here is one the test issued itself.
"""
import json
import subprocess
from pathlib import Path

import hvac
import pytest

from helpers import ceph_env, radosgw_admin, run_module

ROLE = "auth/approle/role/cvmfs-publisher"
VAULT_MODULE = "infn_cloud.cvmfs_publisher.vault_repository_keys"
TOPIC_MODULE = "infn_cloud.cvmfs_publisher.rgw_topic"
PUBLISHER_UID = "devstack"      # devstack/rights.py RGW_PUBLISHER_USER


def _write(path, text):
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


# -- Vault AppRole secret_id -------------------------------------------------------------------------------------------

def test_vault_secret_id_rotates_without_downtime(stack, repo_root, unique_name, tmp_path):
    root = hvac.Client(url=stack["VAULT_ADDR"], token=Path(stack["VAULT_TOKEN_FILE"]).read_text().strip())
    fqrn, subject = unique_name + ".infn.it", "sub-" + unique_name
    subprocess.run([str(repo_root / "devstack" / "stack"), "seed-keys", fqrn, "--subject", subject], check=True,
                   capture_output=True, text=True, timeout=120)
    secret_file = tmp_path / "secret-id"    # the file cvmfs_publisher_vault_secret_id_file names
    old = root.write(ROLE + "/secret-id")["data"]["secret_id"]
    _write(secret_file, old)

    def install(keys):
        return run_module(VAULT_MODULE, dict(
            url=stack["VAULT_ADDR"], role_id_file=stack["VAULT_ROLE_ID_FILE"], secret_id_file=str(secret_file),
            kv_mount=stack["VAULT_KV_MOUNT"], repository=fqrn, subject=subject, keys_dir=str(tmp_path / keys)))

    rc, result = install("k1")
    assert rc == 0 and result["changed"], result
    new = root.write(ROLE + "/secret-id")["data"]["secret_id"]  # a second one; the first stays valid
    _write(secret_file, new)
    rc, result = install("k2")
    assert rc == 0 and result["changed"], "the next run logs in with the new secret_id from the file: %s" % result
    root.write(ROLE + "/secret-id/destroy", secret_id=old)
    rc, result = install("k3")
    assert rc == 0 and result["changed"], "destroying the old secret_id does not touch the new one: %s" % result
    _write(secret_file, old)
    rc, result = install("k4")
    assert rc != 0
    assert result["msg"].startswith("AppRole login at %s (auth mount 'approle') failed: invalid role_id or "
                                    "secret_id" % stack["VAULT_ADDR"]), result["msg"]
    assert old not in json.dumps(result) and new not in json.dumps(result)


# -- the publisher's S3 keys ------------------------------------------------------------------------------------------

@pytest.fixture
def second_key(stack):
    """A key pair added to the publisher's own RGW user (its first pair, the stack's, stays); removed at the end."""
    made = []

    def add():
        before = {k["access_key"] for k in radosgw_admin(stack, "user", "info", "--uid", PUBLISHER_UID)["keys"]}
        info = radosgw_admin(stack, "key", "create", "--uid", PUBLISHER_UID, "--key-type", "s3",
                              "--gen-access-key", "--gen-secret")
        (key,) = [k for k in info["keys"] if k["access_key"] not in before]
        made.append(key["access_key"])
        return key

    yield add
    for access_key in made:
        subprocess.run(["radosgw-admin", "key", "rm", "--uid", PUBLISHER_UID, "--key-type", "s3", "--access-key",
                        access_key], capture_output=True, timeout=120, env=ceph_env(stack))


def test_publisher_s3_keys_rotate_without_downtime(stack, unique_name, tmp_path, second_key):
    access_file, secret_file = tmp_path / "access-key", tmp_path / "secret-key"
    args = dict(endpoint_url=stack["RGW_ENDPOINT"], access_key_file=str(access_file),
                secret_key_file=str(secret_file), name=unique_name,
                push_endpoint="{{ cvmfs_publisher_topic_push_endpoint }}")

    old = second_key()
    _write(access_file, old["access_key"])
    _write(secret_file, old["secret_key"])
    rc, result = run_module(TOPIC_MODULE, args)
    assert rc == 0 and result["changed"], result
    new = second_key()      # radosgw-admin key create: a second pair of the same user, the first still valid
    rc, result = run_module(TOPIC_MODULE, args)
    assert rc == 0 and not result["changed"], "the old pair still works during the overlap: %s" % result
    _write(access_file, new["access_key"])
    _write(secret_file, new["secret_key"])
    radosgw_admin(stack, "key", "rm", "--uid", PUBLISHER_UID, "--key-type", "s3", "--access-key",
                   old["access_key"])
    rc, result = run_module(TOPIC_MODULE, dict(args, state="absent"))
    assert rc == 0 and result["changed"], "the next run reads the new pair from the files: %s" % result
    _write(access_file, old["access_key"])
    _write(secret_file, old["secret_key"])
    rc, result = run_module(TOPIC_MODULE, args)
    assert rc != 0
    assert "InvalidAccessKeyId" in result["msg"], result["msg"]
    assert old["secret_key"] not in json.dumps(result)
