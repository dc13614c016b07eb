"""Run the collection as an operator does: real `ansible-playbook` against the local stack's vars file.

    run_playbook("provision_repository.yml", {"cvmfs_repository": fqrn, ...}, check=True, diff=True)
    rc, result = run_module("infn_cloud.cvmfs_publisher.vault_keys", {...}, check=True, diff=True)

Both pass `-e @$DEVSTACK_DIR/vars.yml` (written by `devstack/stack vars`), so every cvmfs_publisher_* variable
points at the running stack, and modules can use them in their args as `"{{ cvmfs_publisher_vault_url }}"`.
"""
import base64
import functools
import importlib.util
import json
import os
import ssl
import subprocess
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = REPO_ROOT / ".venv" / "bin"
PLAYBOOK_TIMEOUT = 900


def aws_kwargs(stack):
    """boto3 client arguments for the stack's RGW as its S3 user (the publisher's identity)."""
    import botocore.config
    return dict(
        endpoint_url=stack["RGW_ENDPOINT"],
        region_name=stack["RGW_REGION"],
        aws_access_key_id=Path(stack["RGW_ACCESS_KEY_FILE"]).read_text().strip(),
        aws_secret_access_key=Path(stack["RGW_SECRET_KEY_FILE"]).read_text().strip(),
        verify=stack.get("CA_CERT_FILE") or None,
        # RGW 16.2 predates the flexible checksums boto3 sends by default; send them only where S3 requires them.
        # Retries: radosgw 16.2 crashes now and then under the scale-out load and devstack/keepalive.py starts it
        # again (a few seconds, as systemd would); botocore's standard backoff over 10 attempts (~1 minute) rides
        # that out the way an uploader's client would, instead of failing the test on "connection refused".
        config=botocore.config.Config(retries={"max_attempts": 10, "mode": "standard"},
                                      request_checksum_calculation="when_required",
                                      response_checksum_validation="when_required",
                                      s3={"addressing_style": "path"}),
    )


def seed_keys(stack, fqrn, *owner):
    """Store a repository's keys in the stack's Vault, as the Stratum-0 side would: ``owner`` is ``"--subject",
    <sub>`` (personal repository) or ``"--group", <group>``."""
    subprocess.run([str(REPO_ROOT / "devstack" / "stack"), "seed-keys", fqrn, *owner], check=True,
                   capture_output=True, text=True, env=dict(os.environ, DEVSTACK_DIR=stack["DEVSTACK_DIR"]),
                   timeout=120)


@functools.lru_cache(maxsize=None)
def stack_vars_file():
    """Path of the running stack's vars.yml (`devstack/stack vars` writes it for $DEVSTACK_DIR)."""
    proc = subprocess.run([str(REPO_ROOT / "devstack" / "stack"), "vars"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError("cannot get the stack's vars file (%s): run `make stack-up` or `make test`"
                           % proc.stderr.strip())
    return proc.stdout.strip()


def ssl_context(stack):
    """For urllib calls to the stack's HTTP APIs: trusts the stack's CA when it serves TLS, else None."""
    return ssl.create_default_context(cafile=stack["CA_CERT_FILE"]) if stack.get("CA_CERT_FILE") else None


# The stack's broker identities (devstack/rights.py): the env keys of each one's user name and password file.
BROKER_IDENTITIES = {
    "daemon": ("AMQP_USER", "AMQP_PASSWORD_FILE"),
    "api": ("RABBITMQ_API_USER", "RABBITMQ_API_PASSWORD_FILE"),
    "dashboard": ("AMQP_DASHBOARD_USER", "AMQP_DASHBOARD_PASSWORD_FILE"),
    "rgw": ("AMQP_RGW_USER", "AMQP_RGW_PASSWORD_FILE"),
    "admin": ("RABBITMQ_ADMIN_USER", "RABBITMQ_ADMIN_PASSWORD_FILE"),  # tests looking behind the scenes only
}


def broker_credentials(stack, identity="daemon"):
    """(user, password) of one of the stack's broker identities."""
    user_key, password_key = BROKER_IDENTITIES[identity]
    return stack[user_key], Path(stack[password_key]).read_text().strip()


def management_auth(stack, identity="admin"):
    """The Authorization header value for the management API as ``identity``."""
    return "Basic " + base64.b64encode(("%s:%s" % broker_credentials(stack, identity)).encode()).decode()


def amqp_parameters(stack, identity="daemon", **overrides):
    """pika ConnectionParameters for the stack's broker as one of its identities (the daemon's by default; AMQPS
    verified by the stack's CA with TLS)."""
    import pika
    user, password = broker_credentials(stack, identity)
    options = dict(host=stack["AMQP_HOST"], port=int(stack["AMQP_PORT"]), virtual_host=stack["AMQP_VHOST"],
                   credentials=pika.PlainCredentials(user, password))
    if stack.get("CA_CERT_FILE"):
        options["ssl_options"] = pika.SSLOptions(ssl_context(stack), server_hostname=stack["AMQP_HOST"])
    options.update(overrides)
    return pika.ConnectionParameters(**options)


def daemon_amqp_settings(stack):
    """The daemon's ``amqp`` configuration section for the stack (config.py keys)."""
    return {"host": stack["AMQP_HOST"], "port": int(stack["AMQP_PORT"]), "vhost": stack["AMQP_VHOST"],
            "user": stack["AMQP_USER"], "password_file": stack["AMQP_PASSWORD_FILE"],
            "tls": bool(stack.get("CA_CERT_FILE")), "ca_cert": stack.get("CA_CERT_FILE", "")}


def ansible_env(extra=None):
    """Environment for ansible commands: the repository's ansible.cfg, the venv first on PATH, no colours."""
    env = dict(os.environ)
    env.update({
        "ANSIBLE_CONFIG": str(REPO_ROOT / "ansible.cfg"),
        "PATH": "%s%s%s" % (VENV_BIN, os.pathsep, env.get("PATH", "")),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    return env


def _resolve_playbook(playbook):
    """A path, a file name under playbooks/, or a collection playbook FQCN (passed through as is)."""
    path = Path(playbook)
    if path.is_absolute() or path.exists():
        return str(path)
    in_playbooks = REPO_ROOT / "playbooks" / playbook
    if in_playbooks.exists():
        return str(in_playbooks)
    return playbook


def _ansible_flags(check, diff, verbosity):
    flags = ["--check"] if check else []
    if diff:
        flags.append("--diff")
    if verbosity:
        flags.append("-" + "v" * verbosity)
    return flags


def run_playbook(playbook, extra_vars, *, check=False, diff=False, verbosity=0, env=None):
    """Run ansible-playbook with the stack's vars file plus extra_vars; returns the CompletedProcess (text)."""
    argv = [str(VENV_BIN / "ansible-playbook"), _resolve_playbook(playbook), "-e", "@" + stack_vars_file()]
    if extra_vars:
        argv += ["-e", json.dumps(extra_vars)]
    argv += _ansible_flags(check, diff, verbosity)
    return subprocess.run(argv, cwd=str(REPO_ROOT), env=ansible_env(env), capture_output=True, text=True,
                          timeout=PLAYBOOK_TIMEOUT)


def run_module(module_fqcn, args, *, check=False, diff=False, verbosity=0):
    """Run one module on localhost; returns (rc, result) with result the module's full registered result.

    ansible-core has no JSON stdout callback (that one lives in ansible.posix) and the ad-hoc screen output drops
    `diff` and `invocation` below -vvv, so the module runs in a one-task playbook whose result is registered and
    written to a file, failed or not. rc is ansible-playbook's (2 when the module failed); the result holds what
    an operator would see, so no_log masking (`invocation.module_args`) can be asserted on.
    """
    with tempfile.TemporaryDirectory(prefix="run_module-") as tmp:
        result_file = os.path.join(tmp, "result.json")
        playbook = [{
            "name": "run %s" % module_fqcn,
            "hosts": "localhost",
            "gather_facts": False,
            "tasks": [{
                "block": [{"name": module_fqcn, module_fqcn: args, "register": "module_result"}],
                "always": [{
                    "name": "save the result",
                    "ansible.builtin.copy": {"content": "{{ module_result | to_json }}", "dest": result_file,
                                             "mode": "0600"},
                    "check_mode": False,
                    "diff": False,
                }],
            }],
        }]
        playbook_file = os.path.join(tmp, "run_module.yml")
        with open(playbook_file, "w") as handle:
            json.dump(playbook, handle)  # JSON is YAML
        proc = run_playbook(playbook_file, None, check=check, diff=diff, verbosity=verbosity)
        try:
            with open(result_file) as handle:
                return proc.returncode, json.load(handle)
        except FileNotFoundError:
            # The task never ran (unknown module, bad arguments, syntax error): report ansible's own words.
            return proc.returncode, {"failed": True, "msg": "module did not run:\n%s%s"
                                     % (proc.stdout[-3000:], proc.stderr[-3000:])}


def consumer_e2e():
    """The daemon harness (tests/daemon_harness.py: the stack's broker and buckets, DaemonProcess), for the tests
    and benchmarks that run the real daemon."""
    return importlib.import_module("daemon_harness")


def run_modules(calls, *, check=False):
    """Run several modules as the tasks of one play (one ansible start-up for all), each one run even when an
    earlier one failed; returns their full registered results in order. ``calls`` is [(module fqcn, args)]."""
    with tempfile.TemporaryDirectory(prefix="run_modules-") as tmp:
        result_file = os.path.join(tmp, "results.json")
        tasks = [{"name": "%d %s" % (index, fqcn), fqcn: args, "register": "result_%d" % index, "ignore_errors": True}
                 for index, (fqcn, args) in enumerate(calls)]
        registered = ", ".join("result_%d" % index for index in range(len(calls)))
        tasks.append({"name": "save the results", "check_mode": False, "diff": False,
                      "ansible.builtin.copy": {"content": "{{ [%s] | to_json }}" % registered, "dest": result_file,
                                               "mode": "0600"}})
        playbook_file = os.path.join(tmp, "run_modules.yml")
        with open(playbook_file, "w") as handle:
            json.dump([{"name": "run modules", "hosts": "localhost", "gather_facts": False, "tasks": tasks}], handle)
        proc = run_playbook(playbook_file, None, check=check)
        if not os.path.exists(result_file):
            raise AssertionError("the modules did not run:\n%s%s" % (proc.stdout[-3000:], proc.stderr[-3000:]))
        with open(result_file) as handle:
            return json.load(handle)


def ceph_env(stack):
    """The environment for Ceph's own tools (radosgw-admin, rados) on the stack."""
    return dict(os.environ, CEPH_CONF=str(Path(stack["DEVSTACK_DIR"]) / "ceph" / "ceph.conf"))


def radosgw_admin(stack, *args):
    """radosgw-admin on the stack; its JSON answer (None when it printed nothing). The output can hold keys: a
    failure shows the command and exit code only."""
    result = subprocess.run(["radosgw-admin"] + list(args), capture_output=True, text=True, timeout=120,
                            env=ceph_env(stack))
    assert result.returncode == 0, "radosgw-admin %s: exit %d" % (args[:2], result.returncode)
    return json.loads(result.stdout) if result.stdout.strip() else None
