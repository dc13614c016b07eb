"""cvmfs_repository through real ansible-playbook against the stack's cvmfs_server stand-in, keys from its Vault."""
import os
import pwd
import subprocess
from pathlib import Path

import pytest

from helpers import run_module

MODULE = "infn_cloud.cvmfs_publisher.cvmfs_repository"
KEYS_MODULE = "infn_cloud.cvmfs_publisher.vault_repository_keys"
# owner defaults to the user running the module: ansible runs it locally as this user
CURRENT_USER = pwd.getpwuid(os.geteuid()).pw_name


def cvmfs_server(stack, *args):
    return subprocess.run([stack["CVMFS_SERVER_BIN"]] + list(args), capture_output=True, text=True, timeout=120)


@pytest.fixture
def repository(stack, repo_root, unique_name):
    """A repository name whose keys are seeded in Vault and installed in the stand-in's keys folder."""
    fqrn = "%s.infn.it" % unique_name
    subject = "sub-" + unique_name
    subprocess.run([str(repo_root / "devstack" / "stack"), "seed-keys", fqrn, "--subject", subject], check=True,
                   capture_output=True, text=True, env=dict(os.environ, DEVSTACK_DIR=stack["DEVSTACK_DIR"]))
    root = Path(stack["CVMFS_STANDIN_ROOT"])
    keys_dir = root / "etc" / "cvmfs" / "keys"
    rc, keys = run_module(KEYS_MODULE, dict(
        url=stack["VAULT_ADDR"], role_id_file=stack["VAULT_ROLE_ID_FILE"], secret_id_file=stack["VAULT_SECRET_ID_FILE"],
        repository=fqrn, subject=subject, keys_dir=str(keys_dir)))
    assert rc == 0, keys
    stratum0 = "%s/%s" % (stack["CVMFS_STRATUM0_URL"], fqrn)
    yield dict(
        fqrn=fqrn, root=root, keys_dir=keys_dir, stratum0=stratum0,
        upstream="gw,/srv/cvmfs/%s/data/txn,%s" % (fqrn, stack["CVMFS_GATEWAY_URL"]),
        server_conf=root / "etc" / "cvmfs" / "repositories.d" / fqrn / "server.conf",
        args=dict(name=fqrn, stratum0_url=stratum0, gateway_url=stack["CVMFS_GATEWAY_URL"],
                  cvmfs_server_bin=stack["CVMFS_SERVER_BIN"], cvmfs_root=stack["CVMFS_STANDIN_ROOT"]))
    cvmfs_server(stack, "abort", "-f", fqrn)
    cvmfs_server(stack, "rmfs", "-f", fqrn)


def test_create_is_idempotent_and_check_mode_predicts(stack, repository):
    fqrn, args = repository["fqrn"], repository["args"]
    rc, predicted = run_module(MODULE, args, check=True, diff=True)
    assert rc == 0, predicted
    assert predicted["changed"] is True
    assert predicted["diff"] == {"before": {"exists": False, "stratum0": None, "upstream": None},
                                 "after": {"exists": True, "stratum0": repository["stratum0"],
                                           "upstream": repository["upstream"]}}
    assert not repository["server_conf"].exists(), "check mode created the repository"

    rc, created = run_module(MODULE, args, diff=True)
    assert rc == 0, created
    assert created["changed"] is True
    assert created["repository"] == {"name": fqrn, "exists": True, "stratum0": repository["stratum0"],
                                     "upstream": repository["upstream"], "owner": CURRENT_USER,
                                     "in_transaction": False}
    assert created["diff"]["after"] == predicted["diff"]["after"]
    assert "%s (stratum0 / gw)" % fqrn in cvmfs_server(stack, "list").stdout

    rc, again = run_module(MODULE, args, diff=True)
    assert rc == 0 and again["changed"] is False, again
    assert again["diff"]["before"] == again["diff"]["after"]
    rc, check_again = run_module(MODULE, args, check=True)
    assert rc == 0 and check_again["changed"] is False, check_again


def test_open_transaction_is_reported(stack, repository):
    fqrn = repository["fqrn"]
    run_module(MODULE, repository["args"])
    opened = cvmfs_server(stack, "transaction", fqrn)
    assert opened.returncode == 0, opened.stderr
    rc, result = run_module(MODULE, repository["args"])
    assert rc == 0 and result["changed"] is False, result
    assert result["repository"]["in_transaction"] is True


def test_existing_repository_with_another_stratum0_fails(repository):
    run_module(MODULE, repository["args"])
    other = "http://127.0.0.1:1/cvmfs/%s" % repository["fqrn"]
    rc, result = run_module(MODULE, dict(repository["args"], stratum0_url=other))
    assert rc != 0 and result["failed"]
    assert "CVMFS_STRATUM0 is '%s', wanted '%s'" % (repository["stratum0"], other) in result["msg"]
    assert "CVMFS_STRATUM0=%s\n" % repository["stratum0"] in repository["server_conf"].read_text(), "was recreated"


def test_existing_repository_with_another_gateway_fails(repository):
    run_module(MODULE, repository["args"])
    rc, result = run_module(MODULE, dict(repository["args"], gateway_url="http://127.0.0.1:1/api/v1"))
    assert rc != 0 and result["failed"]
    assert ("CVMFS_UPSTREAM_STORAGE is '%s', wanted 'gw,/srv/cvmfs/%s/data/txn,http://127.0.0.1:1/api/v1'"
            % (repository["upstream"], repository["fqrn"])) in result["msg"]


def test_remove_keeping_keys_then_without(repository):
    fqrn, args = repository["fqrn"], repository["args"]
    gw_key = repository["keys_dir"] / (fqrn + ".gw")
    run_module(MODULE, args)
    absent = dict(args, state="absent", keep_keys=True)
    rc, predicted = run_module(MODULE, absent, check=True, diff=True)
    assert rc == 0 and predicted["changed"] is True, predicted
    assert predicted["diff"]["after"] == {"exists": False, "stratum0": None, "upstream": None}
    assert repository["server_conf"].exists(), "check mode removed the repository"

    rc, removed = run_module(MODULE, absent)
    assert rc == 0 and removed["changed"] is True, removed
    assert not repository["server_conf"].exists()
    assert gw_key.exists(), "keep_keys removed the keys"
    rc, again = run_module(MODULE, absent)
    assert rc == 0 and again["changed"] is False, again

    run_module(MODULE, args)
    rc, removed = run_module(MODULE, dict(args, state="absent"))
    assert rc == 0 and removed["changed"] is True, removed
    assert not gw_key.exists(), "rmfs without -p keeps the keys"


def test_missing_keys_are_named(repository):
    os.remove(repository["keys_dir"] / (repository["fqrn"] + ".crt"))
    rc, result = run_module(MODULE, repository["args"])
    assert rc != 0 and result["failed"]
    assert result["msg"].startswith("cannot create %s: key file %s missing"
                                    % (repository["fqrn"], repository["keys_dir"] / (repository["fqrn"] + ".crt")))
    assert not repository["server_conf"].exists()


def test_failing_command_reports_command_rc_and_stderr(repository, tmp_path):
    """Keys in another folder while the tool's own folder holds some: the real tool (and the stand-in) refuse."""
    fqrn = repository["fqrn"]
    elsewhere = tmp_path / "keys"
    elsewhere.mkdir()
    for suffix in (".crt", ".pub", ".gw"):
        (elsewhere / (fqrn + suffix)).write_text("other\n")
    rc, result = run_module(MODULE, dict(repository["args"], keys_dir=str(elsewhere)))
    assert rc != 0 and result["failed"]
    assert result["rc"] == 1
    assert result["command"] == "%s mkfs -w %s -u %s -k %s -o %s %s" % (
        repository["args"]["cvmfs_server_bin"], repository["stratum0"], repository["upstream"], elsewhere,
        CURRENT_USER, fqrn)
    assert "failed with exit code 1: " in result["msg"]
    assert "would overwrite keys in '/etc/cvmfs/keys'" in result["msg"]  # the real tool's words
    assert not repository["server_conf"].exists()


@pytest.mark.parametrize("fqrn,reason", [
    ("a" * 58 + ".it", "longer than 60 characters"),
    ("bad name.infn.it", "CVMFS allows only letters, digits"),
    (".alice.infn.it", "CVMFS allows only letters, digits"),
])
def test_invalid_repository_names(stack, fqrn, reason):
    rc, result = run_module(MODULE, dict(name=fqrn, stratum0_url="http://x/cvmfs/" + fqrn,
                                         gateway_url=stack["CVMFS_GATEWAY_URL"],
                                         cvmfs_server_bin=stack["CVMFS_SERVER_BIN"],
                                         cvmfs_root=stack["CVMFS_STANDIN_ROOT"]))
    assert rc != 0 and result["failed"]
    assert reason in result["msg"] and repr(fqrn) in result["msg"]


def test_half_created_repository_is_never_present_and_is_repaired(stack, repository):
    """Contract: mkfs writes server.conf before importing keys and creating spool and union, so a failed mkfs
    (here: the .gw key missing) leaves config without them; "config exists" alone does not prove a repository."""
    fqrn, keys_dir = repository["fqrn"], repository["keys_dir"]
    gw = keys_dir / (fqrn + ".gw")
    saved = gw.read_bytes()
    gw.unlink()
    failed = cvmfs_server(stack, "mkfs", "-w", repository["stratum0"], "-u", repository["upstream"], "-k",
                          str(keys_dir), "-o", CURRENT_USER, fqrn)
    assert failed.returncode == 1 and repository["server_conf"].exists()
    gw.write_bytes(saved)
    gw.chmod(0o400)
    spool = repository["root"] / "var" / "spool" / "cvmfs" / fqrn

    rc, predicted = run_module(MODULE, repository["args"], check=True, diff=True)
    assert rc == 0 and predicted["changed"], predicted
    assert predicted["diff"]["before"]["exists"] is False, "a half-created repository is never reported present"
    assert str(spool) in predicted["repaired"] and predicted["command"].startswith(
        "%s rmfs -f -p %s; " % (stack["CVMFS_SERVER_BIN"], fqrn))
    assert not spool.exists()

    rc, repaired = run_module(MODULE, repository["args"])
    assert rc == 0 and repaired["changed"] and repaired["repository"]["exists"], repaired
    assert any("half-created" in warning for warning in repaired.get("warnings", []))
    assert spool.is_dir() and cvmfs_server(stack, "transaction", fqrn).returncode == 0
    cvmfs_server(stack, "abort", "-f", fqrn)
    rc, again = run_module(MODULE, repository["args"])
    assert rc == 0 and not again["changed"], again
