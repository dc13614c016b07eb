"""cvmfs_repository and module_utils/_cvmfs.py without the real tool: the pure parts directly, the module with a
recording fake `cvmfs_server` (a script that logs its arguments and creates/removes server.conf)."""
import json
import os
import sys
import textwrap

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _cvmfs as cvmfs
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _cvmfs_repository as repository
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _transaction as txn
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.modules import cvmfs_repository

FQRN = "alice.infn.it"
STRATUM0 = "http://127.0.0.1:8080/cvmfs/alice.infn.it"
GATEWAY = "http://127.0.0.1:4929/api/v1"
UPSTREAM = "gw,/srv/cvmfs/alice.infn.it/data/txn,http://127.0.0.1:4929/api/v1"

FAKE_SERVER = textwrap.dedent("""\
    #!%s
    # Records every call; mkfs writes server.conf the way cvmfs_server does, rmfs removes it.
    import os, sys
    root, args = os.environ["FAKE_ROOT"], sys.argv[1:]
    with open(os.path.join(root, "calls.log"), "a") as log:
        log.write(" ".join(args) + "\\n")
    if os.environ.get("FAKE_FAIL"):
        sys.stdout.write("some progress\\n")
        sys.stderr.write("".join("line %%d\\n" %% i for i in range(30)) + "The repository is broken\\n")
        sys.exit(int(os.environ["FAKE_FAIL"]))
    conf_dir = os.path.join(root, "etc/cvmfs/repositories.d", args[-1])
    if args[0] == "mkfs":
        opts = dict(zip(args[1:-1:2], args[2:-1:2]))
        os.makedirs(conf_dir)
        with open(os.path.join(conf_dir, "server.conf"), "w") as conf:
            conf.write("# Created by cvmfs_server.\\nCVMFS_REPOSITORY_NAME=%%s\\nCVMFS_USER=%%s\\n"
                       "CVMFS_STRATUM0=%%s\\nCVMFS_UPSTREAM_STORAGE=%%s\\n"
                       %% (args[-1], opts["-o"], opts["-w"], opts["-u"]))
        for folder in ("var/spool/cvmfs", "cvmfs"):  # the spool and the union mount
            os.makedirs(os.path.join(root, folder, args[-1]))
    elif args[0] == "rmfs":
        os.remove(os.path.join(conf_dir, "server.conf"))
        os.rmdir(conf_dir)
        for folder in ("var/spool/cvmfs", "cvmfs"):
            os.rmdir(os.path.join(root, folder, args[-1]))
""") % sys.executable


@pytest.fixture
def root(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "etc/cvmfs/keys").mkdir(parents=True)
    for suffix in ("crt", "pub", "gw"):
        (root / "etc/cvmfs/keys" / ("%s.%s" % (FQRN, suffix))).write_text("key")
    fake = tmp_path / "cvmfs_server"
    fake.write_text(FAKE_SERVER)
    fake.chmod(0o755)
    monkeypatch.setenv("FAKE_ROOT", str(root))
    return root


def calls(root):
    log = root / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def repo_module(root, capsys):
    base = dict(name=FQRN, stratum0_url=STRATUM0, gateway_url=GATEWAY, owner="cvmfs",
                cvmfs_root=str(root), cvmfs_server_bin=str(root.parent / "cvmfs_server"))

    def run(check=False, diff=True, **overrides):
        args = dict(base, **overrides)
        args = dict((k, v) for k, v in args.items() if v is not None)
        args.update(_ansible_check_mode=check, _ansible_diff=diff)
        with patch_module_args(args):
            with pytest.raises(SystemExit):
                cvmfs_repository.main()
        return json.loads(capsys.readouterr().out)
    return run


# -- pure parts -------------------------------------------------------------------------------------------------

def test_parse_server_conf_reads_shell_assignments():
    text = textwrap.dedent("""\
        # Created by cvmfs_server.
        CVMFS_REPOSITORY_NAME=alice.infn.it

        export CVMFS_USER=cvmfs
        CVMFS_STRATUM0="http://s0/cvmfs/alice.infn.it"   # trailing comment
        CVMFS_UPSTREAM_STORAGE='gw,/srv/txn,http://gw:4929/api/v1'
        CVMFS_EMPTY=
        CVMFS_SPACES="a b  c"
        CVMFS_HASH=http://h/x#frag # a '#' inside a word is not a comment
        CVMFS_QUOTED_HASH="a # b" # but this one is
        not an assignment
        BROKEN="unbalanced
        1BAD=x
        """)
    assert cvmfs.parse_server_conf(text) == {
        "CVMFS_REPOSITORY_NAME": "alice.infn.it",
        "CVMFS_USER": "cvmfs",
        "CVMFS_STRATUM0": "http://s0/cvmfs/alice.infn.it",
        "CVMFS_UPSTREAM_STORAGE": "gw,/srv/txn,http://gw:4929/api/v1",
        "CVMFS_EMPTY": "",
        "CVMFS_SPACES": "a b  c",
        "CVMFS_HASH": "http://h/x#frag",
        "CVMFS_QUOTED_HASH": "a # b",
    }


def test_parse_list_output():
    text = "alice.infn.it (stratum0 / gw - in transaction)\nbob.infn.it (stratum0 / gw)\n\n"
    assert cvmfs.parse_list_output(text) == [
        dict(name="alice.infn.it", type="stratum0", upstream_type="gw", in_transaction=True, flags=["in transaction"]),
        dict(name="bob.infn.it", type="stratum0", upstream_type="gw", in_transaction=False, flags=[]),
    ]


def test_rooted_paths():
    assert cvmfs.rooted("", "/etc/cvmfs/keys") == "/etc/cvmfs/keys"
    assert cvmfs.rooted("/tmp/r", "/etc/cvmfs/keys") == "/tmp/r/etc/cvmfs/keys"
    server = cvmfs.CvmfsServer(root="/tmp/r")
    assert server.server_conf(FQRN) == "/tmp/r/etc/cvmfs/repositories.d/alice.infn.it/server.conf"
    assert server.union_dir(FQRN) == "/tmp/r/cvmfs/alice.infn.it"


def test_upstream_refuses_commas():
    assert repository.upstream_storage("/srv/txn", GATEWAY) == "gw,/srv/txn," + GATEWAY
    with pytest.raises(cvmfs.CvmfsError, match="gateway_url 'http://a,b' must be non-empty and contain no comma"):
        repository.upstream_storage("/srv/txn", "http://a,b")


def test_display_command_hides_url_credentials():
    assert cvmfs.display_command(["cvmfs_server", "mkfs", "-w", "https://u:p@s0/cvmfs/x", "a b"]) == \
        "cvmfs_server mkfs -w 'https://***@s0/cvmfs/x' 'a b'"


class Recorder:
    def __init__(self, rc=0, stdout="", stderr=""):
        self.rc, self.stdout, self.stderr, self.argv = rc, stdout, stderr, []

    def __call__(self, argv):
        self.argv.append(argv)
        return self.rc, self.stdout, self.stderr


@pytest.mark.parametrize("call,argv", [
    (lambda s: s.transaction(FQRN), ["transaction", FQRN]),
    (lambda s: s.transaction(FQRN, retry_timeout=30, subpath="/sw/x/"), ["transaction", "-t", "30", FQRN + "/sw/x"]),
    (lambda s: s.publish(FQRN), ["publish", "-f", FQRN]),
    (lambda s: s.abort(FQRN), ["abort", "-f", FQRN]),
    (lambda s: s.rmfs(FQRN, keep_keys=True), ["rmfs", "-f", "-p", FQRN]),
    (lambda s: s.mkfs(FQRN, STRATUM0, UPSTREAM, "/k", "cvmfs"),
     ["mkfs", "-w", STRATUM0, "-u", UPSTREAM, "-k", "/k", "-o", "cvmfs", FQRN]),
])
def test_server_commands(call, argv):
    recorder = Recorder()
    call(cvmfs.CvmfsServer("/opt/cvmfs_server", runner=recorder))
    assert recorder.argv == [["/opt/cvmfs_server"] + argv]


def test_mkfs_and_rmfs_return_the_command_and_run_it_only_outside_check_mode():
    recorder = Recorder()
    server = cvmfs.CvmfsServer("/opt/cvmfs_server", runner=recorder)
    assert server.rmfs(FQRN, keep_keys=True, check_mode=True) == "/opt/cvmfs_server rmfs -f -p " + FQRN
    assert server.mkfs(FQRN, "http://u:pw@s0/x", UPSTREAM, "/k", "cvmfs", check_mode=True) == (
        "/opt/cvmfs_server mkfs -w 'http://***@s0/x' -u %s -k /k -o cvmfs %s" % (UPSTREAM, FQRN))
    assert recorder.argv == []
    assert server.rmfs(FQRN) == "/opt/cvmfs_server rmfs -f " + FQRN
    assert recorder.argv == [["/opt/cvmfs_server", "rmfs", "-f", FQRN]]


def test_command_error_keeps_exit_code_and_stderr_tail():
    noise = "\n".join("l%d" % i for i in range(40))
    recorder = Recorder(rc=17, stderr=noise + "\nanother transaction is already open\n")
    with pytest.raises(cvmfs.CvmfsCommandError) as err:
        cvmfs.CvmfsServer(runner=recorder).transaction(FQRN)
    assert err.value.rc == cvmfs.RC_ALREADY_IN_TRANSACTION
    assert err.value.msg.startswith("cvmfs_server transaction alice.infn.it failed with exit code 17: l21\n")
    assert err.value.msg.endswith("another transaction is already open")
    assert "l20" not in err.value.msg


def test_missing_binary_is_named():
    with pytest.raises(cvmfs.CvmfsError, match="cannot run /nonexistent/cvmfs_server: No such file or directory"):
        cvmfs.CvmfsServer("/nonexistent/cvmfs_server").list()


def test_list_parses_the_command_output():
    recorder = Recorder(stdout="alice.infn.it (stratum0 / gw)\n")
    assert cvmfs.CvmfsServer(runner=recorder).list()[0]["name"] == FQRN


# -- the module ---------------------------------------------------------------------------------------------------

def test_creates_in_gateway_mode(repo_module, root):
    result = repo_module()
    assert not result.get("failed"), result
    assert calls(root) == ["mkfs -w %s -u %s -k %s -o cvmfs %s" % (STRATUM0, UPSTREAM, root / "etc/cvmfs/keys", FQRN)]
    assert result["changed"] is True
    assert result["repository"] == dict(name=FQRN, exists=True, stratum0=STRATUM0, upstream=UPSTREAM, owner="cvmfs",
                                        in_transaction=False)
    assert result["diff"] == dict(before=dict(exists=False, stratum0=None, upstream=None),
                                  after=dict(exists=True, stratum0=STRATUM0, upstream=UPSTREAM))


def test_second_run_runs_nothing(repo_module, root):
    repo_module()
    result = repo_module()
    assert result["changed"] is False and len(calls(root)) == 1
    assert result["diff"]["before"] == result["diff"]["after"]


def test_check_mode_predicts_without_running(repo_module, root):
    result = repo_module(check=True)
    assert result["changed"] is True and calls(root) == []
    assert result["repository"]["stratum0"] == STRATUM0
    assert result["command"].startswith("%s mkfs -w " % (root.parent / "cvmfs_server"))
    assert not (root / "etc/cvmfs/repositories.d").exists()


def test_txn_dir_and_keys_dir_are_passed(repo_module, root, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    for suffix in ("crt", "pub", "gw"):
        (keys / ("%s.%s" % (FQRN, suffix))).write_text("key")
    result = repo_module(txn_dir="/var/txn", keys_dir=str(keys))
    assert result["repository"]["upstream"] == "gw,/var/txn," + GATEWAY
    assert " -k %s " % keys in calls(root)[0]


def test_other_stratum0_fails_naming_both_values(repo_module, root):
    repo_module()
    result = repo_module(stratum0_url="http://elsewhere/cvmfs/alice.infn.it")
    assert result["failed"]
    assert ("CVMFS_STRATUM0 is '%s', wanted 'http://elsewhere/cvmfs/alice.infn.it'" % STRATUM0) in result["msg"]
    assert "it is not recreated" in result["msg"]
    assert len(calls(root)) == 1


def test_other_upstream_fails_naming_both_values(repo_module):
    repo_module()
    result = repo_module(gateway_url="http://gw2:4929/api/v1")
    assert result["failed"]
    assert ("CVMFS_UPSTREAM_STORAGE is '%s', wanted 'gw,/srv/cvmfs/alice.infn.it/data/txn,http://gw2:4929/api/v1'"
            % UPSTREAM) in result["msg"]


def test_missing_keys_are_named_before_mkfs(repo_module, root):
    os.remove(root / "etc/cvmfs/keys" / (FQRN + ".gw"))
    result = repo_module()
    assert result["failed"]
    assert result["msg"].startswith("cannot create alice.infn.it: key file %s missing"
                                    % (root / "etc/cvmfs/keys" / (FQRN + ".gw")))
    assert calls(root) == []


def test_failing_command_reports_command_rc_and_stderr_tail(repo_module, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "3")
    result = repo_module()
    assert result["failed"]
    assert result["rc"] == 3
    assert " mkfs -w %s " % STRATUM0 in result["command"]
    assert "failed with exit code 3: " in result["msg"]
    assert result["msg"].endswith("line 29\nThe repository is broken")
    assert "line 9\n" not in result["msg"]


def test_absent_removes_and_keeps_keys_on_request(repo_module, root):
    repo_module()
    predicted = repo_module(check=True, state="absent", keep_keys=True)
    assert predicted["changed"] is True and predicted["command"].endswith("rmfs -f -p alice.infn.it")
    assert len(calls(root)) == 1
    result = repo_module(state="absent", keep_keys=True)
    assert result["changed"] is True and calls(root)[-1] == "rmfs -f -p alice.infn.it"
    assert result["repository"]["exists"] is False
    assert result["diff"]["after"] == dict(exists=False, stratum0=None, upstream=None)
    again = repo_module(state="absent")
    assert again["changed"] is False and len(calls(root)) == 2


def test_absent_default_deletes_keys_with_rmfs(repo_module, root):
    repo_module()
    repo_module(state="absent")
    assert calls(root)[-1] == "rmfs -f alice.infn.it"


def test_in_transaction_from_the_spool_lock(repo_module, root):
    repo_module()
    spool = root / "var/spool/cvmfs" / FQRN
    spool.mkdir(parents=True, exist_ok=True)
    (spool / "in_transaction.lock").write_text("")
    assert repo_module()["repository"]["in_transaction"] is True


def test_half_created_repository_is_reported(repo_module, root):
    (root / "etc/cvmfs/repositories.d" / FQRN).mkdir(parents=True)
    result = repo_module()
    assert result["failed"] and "is half-created" in result["msg"]


@pytest.mark.parametrize("fqrn,reason", [
    ("a" * 58 + ".it", "longer than 60 characters"),
    ("al/ice.infn.it", "CVMFS allows only letters"),
    (".alice.infn.it", "CVMFS allows only letters"),
])
def test_invalid_names_are_refused_before_any_command(repo_module, root, fqrn, reason):
    result = repo_module(name=fqrn)
    assert result["failed"] and reason in result["msg"]
    assert calls(root) == []


def test_present_requires_urls(repo_module):
    result = repo_module(stratum0_url=None)
    assert result["failed"] and "stratum0_url" in result["msg"]


# --- cvmfs_server retry policy (_txn.with_busy_retries: no service needed) -------------------------------

def busy(rc):
    return cvmfs.CvmfsCommandError(["cvmfs_server", "transaction", "alice.infn.it"], rc, "", "lease busy")


@pytest.mark.parametrize("rc", [16, 17])
def test_busy_exit_codes_are_retried_with_growing_pauses_then_fail_clearly(rc):
    pauses, calls = [], []

    def always_busy():
        calls.append(1)
        raise busy(rc)

    with pytest.raises(cvmfs.CvmfsError) as failure:
        txn.with_busy_retries(always_busy, retries=3, sleep=pauses.append)
    assert len(calls) == 4 and len(pauses) == 3
    assert pauses[0] < 1.01 and pauses[2] >= 2.0, "exponential backoff with jitter"
    assert "gave up after 4 attempts (exit code %d)" % rc in failure.value.msg
    assert ("lease path is busy" if rc == 16 else "another transaction is open") in failure.value.msg


def test_busy_then_free_succeeds_and_other_failures_are_not_retried():
    answers = [busy(16), busy(17), "opened"]

    def flaky():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert txn.with_busy_retries(flaky, retries=5, sleep=lambda s: None) == "opened"
    with pytest.raises(Exception) as failure:
        txn.with_busy_retries(lambda: (_ for _ in ()).throw(busy(1)), retries=5, sleep=lambda s: None)
    assert failure.value.rc == 1
