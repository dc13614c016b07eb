"""vault_repository_keys through real ansible-playbook against the stack's OpenBao and its read-only AppRole."""
import json
import os
import socket
import stat
import tempfile
import urllib.request
from pathlib import Path

import pytest

from helpers import run_module, run_playbook, seed_keys

MODULE = "infn_cloud.cvmfs_publisher.vault_repository_keys"
SUFFIXES = ((".crt", "certificateKey", 0o444), (".pub", "publicKey", 0o444), (".gw", "gatewayKey", 0o400))


def vault_call(stack, method, path, body=None):
    """A call to the stack's Vault with the root token (seeding and reading the truth, never the module's way)."""
    token = Path(stack["VAULT_TOKEN_FILE"]).read_text().strip()
    request = urllib.request.Request("%s/v1/%s" % (stack["VAULT_ADDR"], path), method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"X-Vault-Token": token, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        text = reply.read()
    return json.loads(text) if text else None


def vault_keys(stack, secret_path):
    return vault_call(stack, "GET", "%s/data/%s" % (stack["VAULT_KV_MOUNT"], secret_path))["data"]["data"]


def connection(stack):
    return dict(url=stack["VAULT_ADDR"], role_id_file=stack["VAULT_ROLE_ID_FILE"],
                secret_id_file=stack["VAULT_SECRET_ID_FILE"], kv_mount=stack["VAULT_KV_MOUNT"])


@pytest.fixture
def keys_dir():
    with tempfile.TemporaryDirectory(prefix="keys-") as tmp:
        yield Path(tmp) / "etc" / "cvmfs" / "keys"


@pytest.fixture
def personal(stack, unique_name, keys_dir):
    """A personal repository whose keys are seeded in Vault; `args` installs them into a fresh keys folder."""
    fqrn, subject = "%s.infn.it" % unique_name, "sub-" + unique_name
    seed_keys(stack, fqrn, "--subject", subject)
    secret_path = "%s/cvmfs_keys/%s" % (subject, fqrn)
    return dict(fqrn=fqrn, secret_path=secret_path, keys=vault_keys(stack, secret_path),
                args=dict(connection(stack), repository=fqrn, subject=subject, keys_dir=str(keys_dir)))


def key_file(keys_dir, fqrn, suffix):
    return keys_dir / (fqrn + suffix)


def assert_files_match(keys_dir, fqrn, keys):
    for suffix, field, mode in SUFFIXES:
        path = key_file(keys_dir, fqrn, suffix)
        assert path.read_text() == keys[field], "%s differs from Vault's %s" % (path, field)
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_install_is_idempotent_and_check_mode_predicts(personal, keys_dir):
    fqrn = personal["fqrn"]
    rc, predicted = run_module(MODULE, personal["args"], check=True, diff=True)
    assert rc == 0, predicted
    assert predicted["changed"] is True
    assert [f["changes"] for f in predicted["files"]] == [["created"]] * 3
    assert not keys_dir.exists(), "check mode wrote something"

    rc, first = run_module(MODULE, personal["args"], diff=True)
    assert rc == 0, first
    assert first["changed"] is True
    assert first["path"] == "secrets/" + personal["secret_path"]
    assert [(f["path"], f["mode"]) for f in first["files"]] == [
        (str(key_file(keys_dir, fqrn, ".crt")), "0444"), (str(key_file(keys_dir, fqrn, ".pub")), "0444"),
        (str(key_file(keys_dir, fqrn, ".gw")), "0400")]
    assert_files_match(keys_dir, fqrn, personal["keys"])
    assert first["diff"]["before"][str(key_file(keys_dir, fqrn, ".gw"))] == {"exists": False}

    rc, second = run_module(MODULE, personal["args"], diff=True)
    assert rc == 0 and second["changed"] is False, second
    rc, check_again = run_module(MODULE, personal["args"], check=True)
    assert rc == 0 and check_again["changed"] is False, check_again


def test_group_repository(stack, unique_name, keys_dir):
    fqrn = "%s.infn.it" % unique_name
    seed_keys(stack, fqrn, "--group", "grp-" + unique_name)
    args = dict(connection(stack), repository=fqrn, group="grp-" + unique_name, keys_dir=str(keys_dir))
    rc, result = run_module(MODULE, args)
    assert rc == 0 and result["changed"] is True, result
    assert result["path"] == "secrets/groups/grp-%s/cvmfs_keys/%s" % (unique_name, fqrn)
    assert_files_match(keys_dir, fqrn, vault_keys(stack, "groups/grp-%s/cvmfs_keys/%s" % (unique_name, fqrn)))


def test_rotated_key_is_rewritten(stack, personal, keys_dir):
    fqrn = personal["fqrn"]
    run_module(MODULE, personal["args"])
    rotated = dict(personal["keys"], gatewayKey="plain_text keygwrotated %s\n" % os.urandom(12).hex())
    vault_call(stack, "POST", "%s/data/%s" % (stack["VAULT_KV_MOUNT"], personal["secret_path"]), {"data": rotated})

    rc, predicted = run_module(MODULE, personal["args"], check=True, diff=True)
    assert rc == 0, predicted
    assert [f["changes"] for f in predicted["files"]] == [[], [], ["content changed"]]
    assert key_file(keys_dir, fqrn, ".gw").read_text() == personal["keys"]["gatewayKey"], "check mode wrote"

    rc, result = run_module(MODULE, personal["args"], diff=True)
    assert rc == 0 and [f["changed"] for f in result["files"]] == [False, False, True], result
    assert_files_match(keys_dir, fqrn, rotated)
    gw = str(key_file(keys_dir, fqrn, ".gw"))
    assert result["diff"]["before"][gw]["sha256"] != result["diff"]["after"][gw]["sha256"]


def test_mode_changed_by_hand_is_fixed(personal, keys_dir):
    fqrn = personal["fqrn"]
    run_module(MODULE, personal["args"])
    os.chmod(key_file(keys_dir, fqrn, ".gw"), 0o644)
    os.chmod(key_file(keys_dir, fqrn, ".pub"), 0o600)
    rc, result = run_module(MODULE, personal["args"], diff=True)
    assert rc == 0, result
    assert [f["changes"] for f in result["files"]] == [[], ["mode 0600 -> 0444"], ["mode 0644 -> 0400"]]
    assert_files_match(keys_dir, fqrn, personal["keys"])


def test_absent_removes_the_files(personal, keys_dir):
    fqrn = personal["fqrn"]
    run_module(MODULE, personal["args"])
    absent = dict(repository=fqrn, keys_dir=personal["args"]["keys_dir"], state="absent")
    rc, predicted = run_module(MODULE, absent, check=True)
    assert rc == 0 and predicted["changed"] is True, predicted
    assert key_file(keys_dir, fqrn, ".gw").exists()
    rc, removed = run_module(MODULE, absent)
    assert rc == 0 and removed["changed"] is True, removed
    assert list(keys_dir.iterdir()) == []
    rc, again = run_module(MODULE, absent)
    assert rc == 0 and again["changed"] is False, again


def test_missing_keys_name_the_path(stack, unique_name, keys_dir):
    fqrn = "%s.infn.it" % unique_name
    args = dict(connection(stack), repository=fqrn, subject="nobody-" + unique_name, keys_dir=str(keys_dir))
    rc, result = run_module(MODULE, args)
    assert rc != 0 and result["failed"]
    assert result["msg"].startswith("no keys for %s at secrets/nobody-%s/cvmfs_keys/%s in Vault at %s"
                                    % (fqrn, unique_name, fqrn, stack["VAULT_ADDR"]))


def test_permission_denied_outside_the_policy(personal, stack):
    rc, result = run_module(MODULE, dict(personal["args"], kv_mount="not-granted"))
    assert rc != 0 and result["failed"]
    assert result["msg"] == ("permission denied reading not-granted/%s from Vault at %s: the AppRole "
                             "'cvmfs-publisher' has no policy allowing 'read' on "
                             "not-granted/data/%s" % (personal["secret_path"], stack["VAULT_ADDR"],
                                                      personal["secret_path"])), "names the identity and the right"


def test_wrong_secret_id(personal, stack, tmp_path):
    wrong = tmp_path / "secret-id"
    wrong.write_text("00000000-0000-0000-0000-000000000000\n")
    rc, result = run_module(MODULE, dict(personal["args"], secret_id_file=str(wrong)))
    assert rc != 0 and result["failed"]
    assert result["msg"].startswith("AppRole login at %s (auth mount 'approle') failed: invalid role_id or secret_id"
                                    % stack["VAULT_ADDR"])


def test_unreachable_vault_names_the_url(personal):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = "http://127.0.0.1:%d" % sock.getsockname()[1]
    rc, result = run_module(MODULE, dict(personal["args"], url=closed))
    assert rc != 0 and result["failed"]
    assert "cannot reach Vault at %s (" % closed in result["msg"]
    assert "Connection refused" in result["msg"]


@pytest.mark.parametrize("fqrn,reason", [
    ("a" * 58 + ".it", "longer than 60 characters"),
    ("alice$x.infn.it", "CVMFS allows only letters, digits"),
    (".alice.infn.it", "CVMFS allows only letters, digits"),
])
def test_invalid_repository_names(stack, keys_dir, fqrn, reason):
    rc, result = run_module(MODULE, dict(connection(stack), repository=fqrn, subject="someone", keys_dir=str(keys_dir)))
    assert rc != 0 and result["failed"]
    assert reason in result["msg"] and repr(fqrn) in result["msg"]
    assert not keys_dir.exists()


def test_no_key_material_in_verbose_output(stack, personal, keys_dir, tmp_path):
    """The whole -vvv --diff output of an install, a rerun, a rotation and a failure holds no key material, and
    not the secret_id given inline."""
    secret_id = Path(stack["VAULT_SECRET_ID_FILE"]).read_text().strip()
    args = dict(personal["args"], secret_id=secret_id)
    del args["secret_id_file"]
    playbook = tmp_path / "secrecy.yml"
    playbook.write_text(json.dumps([{
        "hosts": "localhost", "gather_facts": False,
        "tasks": [{"name": "install", MODULE: args, "ignore_errors": True},
                  {"name": "again", MODULE: args, "ignore_errors": True}],
    }]))
    kv_path = "%s/data/%s" % (stack["VAULT_KV_MOUNT"], personal["secret_path"])
    rotated = dict(personal["keys"], gatewayKey="plain_text keygwrotated %s\n" % os.urandom(12).hex())
    outputs = []
    for change in (None, {"data": rotated}, {"data": {"gatewayKey": rotated["gatewayKey"]}}):
        if change:
            vault_call(stack, "POST", kv_path, change)
        proc = run_playbook(str(playbook), None, diff=True, verbosity=3)
        assert proc.returncode == 0, proc.stdout[-4000:]
        outputs.append(proc.stdout + proc.stderr)
    output = "\n".join(outputs)
    assert "<127.0.0.1>" in output or "ESTABLISH LOCAL CONNECTION" in output, "not a -vvv output"
    assert "content changed" in output, "the rotation was not shown"
    assert "lack fields certificateKey, publicKey" in output, "the failing run did not happen"
    assert key_file(keys_dir, personal["fqrn"], ".gw").read_text() == rotated["gatewayKey"]
    secrets = [secret_id, rotated["gatewayKey"].split()[-1]]
    for field in ("certificateKey", "publicKey", "gatewayKey"):
        lines = [line for line in personal["keys"][field].splitlines() if len(line) >= 16 and "-----" not in line]
        pieces = [line.split()[-1] for line in lines] if field == "gatewayKey" else lines
        assert pieces, field
        secrets += pieces
    leaked = [s for s in secrets if s in output]
    assert not leaked, "key material or secret_id found in the -vvv output (%d of %d pieces)" % (
        len(leaked), len(secrets))
