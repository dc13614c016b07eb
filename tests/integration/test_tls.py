"""TLS on the real stack: `devstack/stack up --tls` (`make test` runs `pytest -m tls` against such a stack).

The tests marked `tls` elsewhere (provisioning, sync, the daemon end to end) prove that everything works over TLS
with verification on, RGW included (it pushes events to AMQPS with `verify-ssl` on). These prove the other half:
nothing is served in plain text, and every client refuses a server whose certificate comes from a CA it was not
given, or names another host, with a message that says so and which option to set. On a plain stack they skip.
"""
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pika
import pytest
import yaml

from helpers import amqp_parameters, daemon_amqp_settings, run_modules

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "devstack"))
import stacklib  # noqa: E402
import tls  # noqa: E402

CLI = REPO_ROOT / ".venv" / "bin" / "cvmfs-publisher"
WRONG_NAME = "wrong.example.org"

pytestmark = pytest.mark.tls


@pytest.fixture(scope="module")
def untrusted_ca(tmp_path_factory):
    """A CA that signed none of the stack's certificates."""
    cert, _key = tls.make_ca(str(tmp_path_factory.mktemp("untrusted-ca")), "a CA nobody trusts")
    return cert


@pytest.fixture(scope="module")
def wrong_name_port(tls_stack, tmp_path_factory):
    """A TLS listener on 127.0.0.1 whose certificate the stack's CA signed, but for another host name only: a client
    trusting the stack's CA and connecting to `localhost` must refuse it. It only completes handshakes."""
    pki = stacklib.Layout(tls_stack["DEVSTACK_DIR"]).pki
    cert, key = tls.make_server_cert(str(tmp_path_factory.mktemp("wrong-name")), pki.ca_cert, pki.ca_key,
                                     names=(WRONG_NAME,), ips=())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    with context.wrap_socket(conn, server_side=True):
                        pass
                except (ssl.SSLError, OSError):  # the client refused our certificate: what the tests expect
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(5)
    listener.close()


# -- nothing in plain text ----------------------------------------------------------------------------------

def test_the_tls_stack_serves_nothing_in_plain_text(tls_stack):
    for name in ("RGW_ENDPOINT", "RABBITMQ_API_URL", "VAULT_ADDR"):
        url = tls_stack[name]
        assert url.startswith("https://"), (name, url)
        plain = "http://" + url[len("https://"):] + "/"
        try:
            status = urllib.request.urlopen(plain, timeout=10).status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (urllib.error.URLError, http.client.HTTPException, OSError):
            continue  # the TLS listener hung up on a plain request
        assert status == 400, "%s answered HTTP %s to plain http" % (plain, status)  # "HTTP request to HTTPS server"
    plain_amqp = pika.ConnectionParameters(tls_stack["AMQP_HOST"], int(tls_stack["AMQP_PORT"]), socket_timeout=5,
                                           connection_attempts=1)
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(plain_amqp)
    assert tls_stack["TOPIC_PUSH_ENDPOINT"].startswith("amqps://localhost:")
    pika.BlockingConnection(amqp_parameters(tls_stack)).close()  # and AMQPS with the stack's CA works


# -- every module refuses a wrong CA and a wrong host name --------------------------------------------------

def _module_calls(stack, urls, ca, fqrn, keys_dir):
    """One call of each module that opens a TLS connection: the Vault, RabbitMQ and RGW modules and cvmfs_sync."""
    return [
        ("infn_cloud.cvmfs_publisher.vault_repository_keys", {
            "repository": fqrn, "subject": "nobody", "keys_dir": keys_dir, "url": urls["vault"], "ca_cert": ca,
            "role_id_file": stack["VAULT_ROLE_ID_FILE"], "secret_id_file": stack["VAULT_SECRET_ID_FILE"]}),
        ("infn_cloud.cvmfs_publisher.amqp_queue", {
            "name": "tls-probe", "api_url": urls["rabbitmq"], "login_user": stack["AMQP_USER"],
            "login_password_file": stack["AMQP_PASSWORD_FILE"], "ca_cert": ca}),
        ("infn_cloud.cvmfs_publisher.rgw_topic", {
            "name": "tls-probe", "push_endpoint": stack["TOPIC_PUSH_ENDPOINT"], "endpoint_url": urls["rgw"],
            "access_key_file": stack["RGW_ACCESS_KEY_FILE"], "secret_key_file": stack["RGW_SECRET_KEY_FILE"],
            "ca_bundle": ca}),
        ("infn_cloud.cvmfs_publisher.cvmfs_sync", {
            "repository": fqrn, "endpoint_url": urls["rgw"], "access_key_file": stack["RGW_ACCESS_KEY_FILE"],
            "secret_key_file": stack["RGW_SECRET_KEY_FILE"], "ca_bundle": ca,
            "cvmfs_server_bin": stack["CVMFS_SERVER_BIN"], "cvmfs_root": stack["CVMFS_STANDIN_ROOT"]}),
    ]


# (module, server as the message names it, the option the message says to set)
MODULE_MESSAGES = [("vault_repository_keys", "Vault", "ca_cert (or VAULT_CACERT)"),
                   ("amqp_queue", "RabbitMQ management API", "ca_cert"),
                   ("rgw_topic", "RGW", "ca_bundle"),
                   ("cvmfs_sync", "RGW", "ca_bundle")]


def _stand_in_repository(stack, fqrn, tmp_path):
    """A repository cvmfs_sync accepts (it checks the repository before it lists the bucket)."""
    keys = tmp_path / "stand-in-keys"
    keys.mkdir()
    for suffix in ("crt", "pub", "gw"):
        (keys / ("%s.%s" % (fqrn, suffix))).write_text("stand-in key\n")
    subprocess.run([stack["CVMFS_SERVER_BIN"], "mkfs", "-w", "%s/%s" % (stack["CVMFS_STRATUM0_URL"], fqrn),
                    "-u", "gw,/srv/cvmfs/%s/data/txn,%s" % (fqrn, stack["CVMFS_GATEWAY_URL"]), "-k", str(keys),
                    "-o", "root", fqrn], check=True, capture_output=True, timeout=120)


def test_every_module_refuses_a_wrong_ca_and_a_wrong_host_name(tls_stack, untrusted_ca, wrong_name_port,
                                                               unique_name, tmp_path):
    stack = tls_stack
    fqrn = unique_name + ".infn.it"
    _stand_in_repository(stack, fqrn, tmp_path)
    keys_dir = str(tmp_path / "keys")
    real = {"vault": stack["VAULT_ADDR"], "rabbitmq": stack["RABBITMQ_API_URL"], "rgw": stack["RGW_ENDPOINT"]}
    wrong_host = dict.fromkeys(real, "https://localhost:%d" % wrong_name_port)
    calls = (_module_calls(stack, real, untrusted_ca, fqrn, keys_dir)
             + _module_calls(stack, wrong_host, stack["CA_CERT_FILE"], fqrn, keys_dir))
    results = run_modules(calls)
    cases = [("the real servers with an untrusted CA", real, ("unable to get local issuer certificate",
                                                               "self-signed certificate in certificate chain")),
             ("a server for another name", wrong_host, ("Hostname mismatch, certificate is not valid for "
                                                        "'localhost'",  # OpenSSL's check
                                                        "hostname 'localhost' doesn't match '%s'" % WRONG_NAME))]
    for index, result in enumerate(results):
        (case, urls, verdicts), (module, server, option) = cases[index // 4], MODULE_MESSAGES[index % 4]
        msg = result.get("msg", "")
        assert result.get("failed"), "%s accepted %s: %s" % (module, case, json.dumps(result)[:2000])
        url = urls["vault" if module.startswith("vault") else "rabbitmq" if module == "amqp_queue" else "rgw"]
        assert "%s at %s" % (server, url) in msg, (module, case, msg)
        assert "TLS certificate verification failed (" in msg, (module, case, msg)
        assert any(verdict in msg for verdict in verdicts), (module, case, msg)
        assert "set %s to the CA bundle" % option in msg, (module, case, msg)
    assert not os.path.exists(keys_dir) or not os.listdir(keys_dir), "no key may be written without Vault"


# -- the daemon's AMQPS connection --------------------------------------------------------------------------

def _first_connect_failure(stack, folder, **amqp_overrides):
    """Run the daemon until it logs its first failed connection; returns that log event."""
    folder.mkdir()
    config = {"amqp": dict(daemon_amqp_settings(stack), reconnect_initial_delay=5, **amqp_overrides),
              "queues": {"publisher": "tls-probe"}, "ansible": {"project_dir": str(REPO_ROOT)},
              "repositories": {"config_dir": str(folder)}, "state_dir": str(folder / "state"), "metrics": {"port": 0}}
    config_path = folder / "config.yml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = folder / "daemon.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([str(CLI), "-c", str(config_path), "run"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for line in log_path.read_text().splitlines():
                event = json.loads(line)
                assert event.get("event") != "connected", "the daemon connected: %s" % line
                if event.get("event") == "connect_failed":
                    return event
            assert process.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.2)
        pytest.fail("the daemon never reported a failed connection:\n" + log_path.read_text()[-3000:])
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text()[-3000:]


def test_the_daemon_refuses_a_broker_from_a_wrong_ca_or_for_another_name(tls_stack, untrusted_ca, wrong_name_port,
                                                                          tmp_path):
    wrong_ca = _first_connect_failure(tls_stack, tmp_path / "wrong-ca", ca_cert=untrusted_ca)
    wrong_name = _first_connect_failure(tls_stack, tmp_path / "wrong-name", host="localhost", port=wrong_name_port)
    for event, verdict in ((wrong_ca, "self-signed certificate in certificate chain"),
                           (wrong_name, "Hostname mismatch, certificate is not valid for 'localhost'")):
        assert event["error_type"] == "SSLCertVerificationError", event
        assert "certificate verify failed: " + verdict in event["message"], event
        assert "set amqp.ca_cert to the CA bundle that signs it" in event["message"], event
