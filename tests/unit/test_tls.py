"""TLS verification: on by default everywhere, impossible to turn off by a default, and refusals worded for operators.

The refusals themselves are proven against real servers in tests/integration/test_tls.py (a `--tls` stack).
"""
import re
from pathlib import Path

import pytest
import yaml

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _module, _rabbitmq, _vault
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw import client as _rgw
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.modules import cvmfs_sync, rgw_topic
from cvmfs_publisher_consumer import config as consumer_config

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("spec", [_vault.VAULT_ARGSPEC, _rgw.RGW_ARGUMENT_SPEC, _rabbitmq.RABBITMQ_ARGUMENT_SPEC],
                         ids=["vault", "rgw", "rabbitmq"])
def test_every_client_verifies_certificates_by_default(spec):
    assert spec["validate_certs"] == dict(type="bool", default=True)


def test_sync_and_topic_verify_by_default():
    assert all(cvmfs_sync.ARGUMENT_SPEC.get(name, spec) == spec for name, spec in _rgw.RGW_ARGUMENT_SPEC.items())
    assert rgw_topic.ARGUMENT_SPEC["verify_ssl"]["default"] is True
    assert rgw_topic.ARGUMENT_SPEC["ca_location"]["default"] == ""


def test_a_ca_bundle_never_turns_rgw_verification_off():
    assert _rgw._verify({"ca_bundle": "/ca.pem", "validate_certs": True}) == "/ca.pem"
    assert _rgw._verify({"ca_bundle": None, "validate_certs": True}) is True
    assert _rgw._verify({}) is True


def test_the_daemon_speaks_amqps_by_default_and_needs_a_ca_for_it():
    assert consumer_config.FIELDS["amqp.tls"].default is True
    assert consumer_config.FIELDS["amqp.port"].default == 5671


def test_no_role_or_playbook_turns_verification_off():
    """Roles and playbooks set validate_certs / verify_ssl to nothing but a literal true (a variable could default
    to false), and the daemon's role defaults to AMQPS."""
    setting = re.compile(r"\b(validate_certs|verify_ssl)\s*:\s*(.*)")
    offenders = []
    for path in list((REPO_ROOT / "roles").rglob("*.yml")) + list((REPO_ROOT / "playbooks").glob("*.yml")):
        for match in setting.finditer(path.read_text()):
            if match.group(2).strip().lower() != "true":
                offenders.append("%s: %s" % (path.relative_to(REPO_ROOT), match.group(0)))
    assert not offenders
    defaults = yaml.safe_load((REPO_ROOT / "roles/publisher/defaults/main.yml").read_text())
    assert defaults["cvmfs_publisher_amqp_tls"] is True


@pytest.mark.parametrize("text, verdict", [
    ("HTTPSConnectionPool(host='127.0.0.1', port=8200): Max retries exceeded with url: /v1/auth/approle/login "
     "(Caused by SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
     "unable to get local issuer certificate (_ssl.c:1006)')))", "unable to get local issuer certificate"),
    ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: Hostname mismatch, certificate is not valid for "
     "'localhost'. (_ssl.c:1006)", "Hostname mismatch, certificate is not valid for 'localhost'"),
    ("SSL validation failed for https://localhost:1/ hostname 'localhost' doesn't match 'wrong.example.org'",
     "hostname 'localhost' doesn't match 'wrong.example.org'"),
])
def test_tls_failure_names_the_server_the_verdict_and_the_option(text, verdict):
    message = _module.tls_failure(Exception(text), "Vault", "https://vault:8200", "ca_cert")
    assert message == ("Vault at https://vault:8200: TLS certificate verification failed (%s); set ca_cert to the CA "
                       "bundle that signs the server's certificate and use a host name the certificate covers"
                       % verdict)


def test_tls_failure_ignores_other_errors():
    assert _module.tls_failure(ConnectionRefusedError("[Errno 111] Connection refused"), "RGW", "u", "x") is None
    eof = Exception("EOF occurred in violation of protocol (_ssl.c:2427)")
    assert _module.tls_failure(eof, "RGW", "u", "x") is None
