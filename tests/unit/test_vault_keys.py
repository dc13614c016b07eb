"""vault_repository_keys and module_utils/_vault.py without a Vault server: hvac's client is replaced by a fake
that holds secrets in a dict and raises hvac's own exceptions."""
import functools
import json
import os
import socket
import stat

import hvac.exceptions
import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _vault as vault
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.modules import vault_repository_keys

FQRN = "alice.infn.it"
SUBJECT = "0d4f7e3a-sub"
ROLE_ID = "role-1234"
SECRET_ID = "secret-id-5678-very-secret"
KEYS = {
    "certificateKey": "-----BEGIN CERTIFICATE-----\nCERTMATERIALxyz123\n-----END CERTIFICATE-----\n",
    "publicKey": "-----BEGIN PUBLIC KEY-----\nPUBMATERIALabc456\n-----END PUBLIC KEY-----\n",
    "gatewayKey": "plain_text keygwalice GWSECRETqwe789\n",
}
SECRET_MARKERS = ["CERTMATERIALxyz123", "PUBMATERIALabc456", "GWSECRETqwe789", SECRET_ID]


class FakeVault:
    """What the fake hvac client sees: secrets by (mount, path), the AppRole credentials, and the calls made."""

    def __init__(self):
        self.secrets = {("secrets", "%s/cvmfs_keys/%s" % (SUBJECT, FQRN)): dict(KEYS)}
        self.credentials = (ROLE_ID, SECRET_ID)
        self.forbidden = set()
        self.busy = 0           # this many calls answer 500 "transaction commit failed" first
        self.calls = []

    def answer_busy(self):
        if self.busy:
            self.busy -= 1
            raise hvac.exceptions.InternalServerError(errors=["transaction commit failed"])


class FakeClient:
    def __init__(self, world, url, verify, timeout):
        self.world, self.url = world, url
        world.calls.append(("client", url, verify, timeout))
        self.auth = self
        self.approle = self
        self.token = self
        self.secrets = self
        self.kv = self
        self.v2 = self

    def login(self, role_id, secret_id=None, mount_point="approle"):
        self.world.calls.append(("login", mount_point))
        self.world.answer_busy()
        if (role_id, secret_id) != self.world.credentials:
            raise hvac.exceptions.InvalidRequest(errors=["invalid role or secret ID"], method="POST",
                                                 url=self.url + "/v1/auth/approle/login")
        return {"auth": {"metadata": {"role_name": "cvmfs-publisher"}}}

    def read_secret_version(self, path, mount_point, raise_on_deleted_version=None):
        self.world.calls.append(("read", mount_point, path))
        self.world.answer_busy()
        if (mount_point, path) in self.world.forbidden:
            raise hvac.exceptions.Forbidden(errors=["permission denied"])
        if (mount_point, path) not in self.world.secrets:
            raise hvac.exceptions.InvalidPath()
        return {"data": {"data": dict(self.world.secrets[(mount_point, path)]), "metadata": {"version": 1}}}

    def revoke_self(self):
        self.world.calls.append(("revoke",))


@pytest.fixture
def fake_vault(monkeypatch):
    world = FakeVault()
    monkeypatch.setattr(vault.hvac, "Client",
                        lambda url, verify, timeout: FakeClient(world, url, verify, timeout))
    return world


@pytest.fixture
def keys_dir(tmp_path):
    return tmp_path / "etc" / "cvmfs" / "keys"


def run_module(args, check=False, diff=False, capsys=None):
    args = dict(args)
    args["_ansible_check_mode"] = check
    args["_ansible_diff"] = diff
    with patch_module_args(args):
        with pytest.raises(SystemExit):
            vault_repository_keys.main()
    out = capsys.readouterr().out
    return json.loads(out), out


@pytest.fixture
def keys_module(keys_dir, capsys, fake_vault):
    base = dict(url="http://vault.test:8200", role_id=ROLE_ID, secret_id=SECRET_ID, repository=FQRN,
                subject=SUBJECT, keys_dir=str(keys_dir))

    def run(check=False, diff=True, **overrides):
        args = dict(base, **overrides)
        args = dict((k, v) for k, v in args.items() if v is not None)
        return run_module(args, check=check, diff=diff, capsys=capsys)
    return run


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def assert_no_secret(text):
    for marker in SECRET_MARKERS:
        assert marker not in text


def test_installs_three_files_with_cvmfs_modes(keys_module, keys_dir, fake_vault):
    result, raw = keys_module()
    assert not result.get("failed"), result
    assert result["changed"] is True
    assert result["path"] == "secrets/%s/cvmfs_keys/%s" % (SUBJECT, FQRN)
    assert [(os.path.basename(f["path"]), f["mode"], f["changed"]) for f in result["files"]] == [
        (FQRN + ".crt", "0444", True), (FQRN + ".pub", "0444", True), (FQRN + ".gw", "0400", True)]
    assert (keys_dir / (FQRN + ".crt")).read_text() == KEYS["certificateKey"]
    assert (keys_dir / (FQRN + ".pub")).read_text() == KEYS["publicKey"]
    assert (keys_dir / (FQRN + ".gw")).read_text() == KEYS["gatewayKey"]
    assert mode_of(keys_dir / (FQRN + ".gw")) == 0o400
    assert mode_of(keys_dir / (FQRN + ".crt")) == 0o444
    assert ("login", "approle") in fake_vault.calls and ("revoke",) in fake_vault.calls
    assert_no_secret(raw)
    gw_after = result["diff"]["after"][str(keys_dir / (FQRN + ".gw"))]
    assert gw_after["mode"] == "0400" and gw_after["sha256"].startswith("sha256:")
    assert sorted(os.listdir(keys_dir)) == sorted(FQRN + s for s in (".crt", ".pub", ".gw")), "temp files left"


def test_second_run_changes_nothing(keys_module):
    keys_module()
    result, _ = keys_module()
    assert result["changed"] is False
    assert all(not f["changed"] for f in result["files"])
    assert result["diff"]["before"] == result["diff"]["after"]


def test_check_mode_predicts_and_writes_nothing(keys_module, keys_dir):
    result, _ = keys_module(check=True)
    assert result["changed"] is True
    assert all(f["changes"] == ["created"] for f in result["files"])
    assert not keys_dir.exists()


def test_rotated_key_rewrites_only_that_file_atomically(keys_module, keys_dir, fake_vault):
    keys_module()
    inodes = dict((s, os.stat(keys_dir / (FQRN + s)).st_ino) for s in (".crt", ".pub", ".gw"))
    fake_vault.secrets[("secrets", "%s/cvmfs_keys/%s" % (SUBJECT, FQRN))]["gatewayKey"] = "plain_text k NEWGWSECRET\n"

    predicted, _ = keys_module(check=True)
    assert [f["changes"] for f in predicted["files"]] == [[], [], ["content changed"]]
    assert (keys_dir / (FQRN + ".gw")).read_text() == KEYS["gatewayKey"]

    result, raw = keys_module()
    assert [f["changed"] for f in result["files"]] == [False, False, True]
    assert "NEWGWSECRET" not in raw
    gw = keys_dir / (FQRN + ".gw")
    assert gw.read_text() == "plain_text k NEWGWSECRET\n" and mode_of(gw) == 0o400
    assert os.stat(gw).st_ino != inodes[".gw"], "a new content is renamed in, not written in place"
    assert os.stat(keys_dir / (FQRN + ".crt")).st_ino == inodes[".crt"]
    gw_diff = (result["diff"]["before"][str(gw)], result["diff"]["after"][str(gw)])
    assert gw_diff[0]["sha256"] != gw_diff[1]["sha256"]


def test_mode_changed_by_hand_is_fixed_in_place(keys_module, keys_dir):
    keys_module()
    gw = keys_dir / (FQRN + ".gw")
    os.chmod(gw, 0o644)
    inode = os.stat(gw).st_ino
    result, _ = keys_module()
    assert result["changed"] is True
    assert result["files"][2]["changes"] == ["mode 0644 -> 0400"]
    assert mode_of(gw) == 0o400 and os.stat(gw).st_ino == inode


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_owner_is_applied_and_corrected(keys_module, keys_dir):
    result, _ = keys_module(owner="1234", file_group="2345")
    assert result["changed"] is True
    gw = keys_dir / (FQRN + ".gw")
    assert (os.stat(gw).st_uid, os.stat(gw).st_gid) == (1234, 2345)
    os.chown(gw, 0, 0)
    result, _ = keys_module(owner="1234", file_group="2345")
    assert result["files"][2]["changes"] == ["owner uid 0 -> 1234", "group gid 0 -> 2345"]
    assert os.stat(gw).st_uid == 1234


def test_unknown_owner_is_refused(keys_module):
    result, _ = keys_module(owner="no-such-user-xyz")
    assert result["failed"] and result["msg"] == "owner 'no-such-user-xyz' is not a user on this host"


def test_absent_removes_the_three_files(keys_module, keys_dir, fake_vault):
    keys_module()
    (keys_dir / "other.infn.it.gw").write_text("keep me")
    calls = len(fake_vault.calls)
    predicted, _ = keys_module(check=True, state="absent", subject=None)
    assert predicted["changed"] is True and (keys_dir / (FQRN + ".gw")).exists()
    result, _ = keys_module(state="absent", subject=None)
    assert result["changed"] is True and [f["changes"] for f in result["files"]] == [["removed"]] * 3
    assert os.listdir(keys_dir) == ["other.infn.it.gw"]
    assert len(fake_vault.calls) == calls, "absent never contacts Vault"
    again, _ = keys_module(state="absent", subject=None)
    assert again["changed"] is False


def test_group_repository_path(keys_module, fake_vault):
    fake_vault.secrets[("kv", "groups/atlas/cvmfs_keys/%s" % FQRN)] = dict(KEYS)
    result, _ = keys_module(subject=None, group="atlas", kv_mount="kv")
    assert result["path"] == "kv/groups/atlas/cvmfs_keys/%s" % FQRN
    assert ("read", "kv", "groups/atlas/cvmfs_keys/%s" % FQRN) in fake_vault.calls


def test_missing_keys_name_path_and_mount(keys_module, keys_dir):
    result, _ = keys_module(subject="bob")
    assert result["failed"]
    assert result["msg"].startswith("no keys for %s at secrets/bob/cvmfs_keys/%s in Vault at http://vault.test:8200"
                                    % (FQRN, FQRN))
    assert not keys_dir.exists()


def test_missing_field_is_named(keys_module, fake_vault):
    del fake_vault.secrets[("secrets", "%s/cvmfs_keys/%s" % (SUBJECT, FQRN))]["gatewayKey"]
    result, raw = keys_module()
    assert result["failed"]
    assert "lack field gatewayKey (present: certificateKey, publicKey)" in result["msg"]
    assert_no_secret(raw)


def test_wrong_secret_id_is_a_clear_login_failure(keys_module, tmp_path):
    secret_file = tmp_path / "secret-id"
    secret_file.write_text("wrong-secret-id-0000\n")
    result, raw = keys_module(secret_id=None, secret_id_file=str(secret_file))
    assert result["failed"]
    assert result["msg"].startswith("AppRole login at http://vault.test:8200 (auth mount 'approle') failed: "
                                    "invalid role_id or secret_id")
    assert "wrong-secret-id-0000" not in raw


def test_secret_id_file_is_read(keys_module, tmp_path):
    secret_file = tmp_path / "secret-id"
    secret_file.write_text(SECRET_ID + "\n")
    result, _ = keys_module(secret_id=None, secret_id_file=str(secret_file))
    assert result["changed"] is True


def test_permission_denied_names_the_policy_path(keys_module, fake_vault):
    fake_vault.forbidden.add(("secrets", "%s/cvmfs_keys/%s" % (SUBJECT, FQRN)))
    result, _ = keys_module()
    assert result["failed"]
    assert result["msg"].startswith("permission denied reading secrets/%s/cvmfs_keys/%s" % (SUBJECT, FQRN))
    assert "secrets/data/%s/cvmfs_keys/%s" % (SUBJECT, FQRN) in result["msg"]
    assert "the AppRole 'cvmfs-publisher' has no policy allowing 'read' on" in result["msg"], "names the identity"


@pytest.fixture
def no_pause(monkeypatch):
    pauses = []
    monkeypatch.setattr(vault, "with_backoff", functools.partial(vault.with_backoff, sleep=pauses.append))
    return pauses


def test_a_busy_vault_is_tried_again(keys_module, keys_dir, fake_vault, no_pause):
    """OpenBao answers 500 "transaction commit failed" to concurrent logins on one secret_id: tried again."""
    fake_vault.busy = 3     # three logins answered busy, the fourth and the read go through
    result, _ = keys_module()
    assert not result.get("failed") and result["changed"], result
    assert [c[0] for c in fake_vault.calls if c[0] in ("login", "read")] == ["login"] * 4 + ["read"]
    assert len(no_pause) == 3 and all(0 <= p <= vault.BUSY_MAX_DELAY for p in no_pause)


def test_a_vault_busy_for_longer_fails_naming_the_answer(keys_module, fake_vault, no_pause):
    fake_vault.busy = 100
    result, _ = keys_module()
    assert result["failed"]
    assert result["msg"] == ("AppRole login at http://vault.test:8200 (auth mount 'approle'): Vault at "
                             "http://vault.test:8200 answered InternalServerError: transaction commit failed")
    assert len(no_pause) == vault.BUSY_RETRIES


def test_unreachable_vault_names_the_url(keys_dir, capsys):
    # the real hvac client against a port nobody listens on
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = "http://127.0.0.1:%d" % port
    result, raw = run_module(dict(url=url, role_id=ROLE_ID, secret_id=SECRET_ID, repository=FQRN, subject=SUBJECT,
                                  keys_dir=str(keys_dir)), capsys=capsys)
    assert result["failed"]
    assert result["msg"] == ("AppRole login at %s (auth mount 'approle'): cannot reach Vault at %s "
                             "([Errno 111] Connection refused)" % (url, url))
    assert SECRET_ID not in raw


@pytest.mark.parametrize("fqrn,reason", [
    ("a" * 58 + ".it", "longer than 60 characters"),
    ("alice;rm.infn.it", "CVMFS allows only letters"),
    (".alice.infn.it", "CVMFS allows only letters"),
    ("alice", "fully qualified"),
])
def test_invalid_repository_names(keys_module, fqrn, reason, fake_vault):
    result, _ = keys_module(repository=fqrn)
    assert result["failed"] and reason in result["msg"]
    assert fake_vault.calls == [], "nothing is asked of Vault for an invalid name"


def test_subject_or_group_required_when_present(keys_module):
    result, _ = keys_module(subject=None)
    assert result["failed"] and "subject, group" in result["msg"]
    result, _ = keys_module(group="atlas")
    assert result["failed"] and "mutually exclusive" in result["msg"]


def test_url_from_vault_addr(keys_module, monkeypatch, fake_vault):
    monkeypatch.setenv("VAULT_ADDR", "http://from-env:8200")
    result, _ = keys_module(url=None)
    assert result["changed"] is True
    assert fake_vault.calls[0][:2] == ("client", "http://from-env:8200")


def test_validate_certs_and_ca_cert_reach_the_client(keys_module, fake_vault, tmp_path):
    keys_module(ca_cert=str(tmp_path / "ca.pem"), timeout=5)
    assert fake_vault.calls[0] == ("client", "http://vault.test:8200", str(tmp_path / "ca.pem"), 5)
    del fake_vault.calls[:]
    keys_module(validate_certs=False)
    assert fake_vault.calls[0] == ("client", "http://vault.test:8200", False, 30)


def test_server_message_scrubs_credentials():
    exc = hvac.exceptions.InvalidRequest(errors=["bad secret_id %s for role %s" % (SECRET_ID, ROLE_ID)])
    assert vault._server_message(exc, ROLE_ID, SECRET_ID) == "bad secret_id ******** for role ********"


def test_a_batch_logs_in_once_and_out_once_for_every_repository(keys_module, keys_dir, fake_vault):
    fake_vault.secrets[("secrets", "groups/atlas/cvmfs_keys/atlas.infn.it")] = dict(KEYS)
    result, raw = keys_module(repository=None, subject=None, batch=[
        {"repository": FQRN, "subject": SUBJECT}, {"fqrn": "atlas.infn.it", "group": "atlas"},
        {"repository": "nokeys.infn.it", "subject": "nobody"}])
    assert result["failed"] and result["msg"].startswith(
        "1 of 3 failed: nokeys.infn.it: no keys for nokeys.infn.it at secrets/nobody/cvmfs_keys/nokeys.infn.it")
    assert [r["changed"] for r in result["results"]] == [True, True, False]
    assert (keys_dir / "atlas.infn.it.gw").read_text() == KEYS["gatewayKey"]
    assert [call[0] for call in fake_vault.calls].count("login") == 1
    assert [call[0] for call in fake_vault.calls].count("revoke") == 1 and fake_vault.calls[-1] == ("revoke",)
    assert_no_secret(raw)


def test_a_refused_login_fails_every_item_of_a_batch_without_trying_again(keys_module, fake_vault):
    fake_vault.credentials = (ROLE_ID, "another-secret-id")
    result, raw = keys_module(repository=None, batch=[{"repository": FQRN}, {"repository": "bob.infn.it"}])
    assert result["msg"].count("invalid role_id or secret_id") == 2, result["msg"]
    assert [call[0] for call in fake_vault.calls].count("login") == 1
    assert_no_secret(raw)
