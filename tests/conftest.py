"""Shared fixtures: the local stack started by `make test` (or `make stack-up`), and clients for it.

Integration tests never start the stack themselves: `make test` brings up `$DEVSTACK_DIR` before pytest and stops it
afterwards; then it starts a second stack with `--tls` and runs the tests marked `tls` against it (clients take the
stack's CA from `stack["CA_CERT_FILE"]`, empty without TLS). Each test makes its own fresh names (`unique_name`), so
tests never depend on one another or on order.
"""
import json
import os
import secrets
import subprocess
from pathlib import Path

import pytest

from helpers import aws_kwargs

REPO_ROOT = Path(__file__).resolve().parent.parent
STACK_CMD = REPO_ROOT / "devstack" / "stack"


def _stack(*args):
    return subprocess.run([str(STACK_CMD), *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="session")
def repo_root():
    return REPO_ROOT


@pytest.fixture(scope="session")
def stack():
    """The `devstack/stack env --json` dict of the running stack in $DEVSTACK_DIR."""
    status = _stack("status")
    if status.returncode != 0:
        pytest.fail("the local stack in %s is not up:\n%s%s\nRun `make stack-up` (then pytest with the same "
                    "DEVSTACK_DIR/DEVSTACK_PORT_BASE) or simply `make test`."
                    % (os.environ.get("DEVSTACK_DIR", REPO_ROOT / ".devstack" / "default"),
                       status.stdout, status.stderr), pytrace=False)
    env = _stack("env", "--json")
    assert env.returncode == 0, env.stderr
    return json.loads(env.stdout)


@pytest.fixture(scope="session")
def tls_stack(stack):
    """The stack, for tests that only make sense when it serves TLS (`devstack/stack up --tls`)."""
    if stack.get("TLS") != "true":
        pytest.skip("needs a stack started with `devstack/stack up --tls` (make test runs these there)")
    return stack


@pytest.fixture(scope="session")
def s3(stack):
    import boto3
    return boto3.client("s3", **aws_kwargs(stack))


@pytest.fixture(scope="session")
def sns(stack):
    """RGW's SNS-compatible topic API (topics with an AMQP push endpoint)."""
    import boto3
    return boto3.client("sns", **aws_kwargs(stack))


@pytest.fixture
def unique_name():
    """A fresh short name valid as bucket, topic, queue and fqrn label: `t` + 8 hex digits."""
    return "t" + secrets.token_hex(4)


def pytest_terminal_summary(terminalreporter, config):
    """How many generated hostile inputs tests/unit/test_hostile_properties.py tried and how many were refused."""
    counts = getattr(config, "hostile_input_counts", None)
    if counts:
        terminalreporter.write_line("hostile inputs: " + ", ".join("%s %d" % item for item in counts.items()))
