import shutil
import ssl
import subprocess

import pika
import pytest

from cvmfs_publisher_consumer import amqp

SETTINGS = {"host": "rabbit.example.org", "port": 5671, "vhost": "/cvmfs", "user": "publisher", "tls": True,
            "ca_cert": "", "client_cert": "", "client_key": "", "server_hostname": "", "heartbeat": 30,
            "connection_timeout": 5.0}


@pytest.fixture
def certificates(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "client.key", tmp_path / "client.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=client",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return {"ca_cert": str(cert), "client_cert": str(cert), "client_key": str(key)}


def test_tls_verifies_the_broker_and_presents_the_client_certificate(certificates):
    parameters = amqp.connection_parameters(dict(SETTINGS, **certificates), "pw")
    context = parameters.ssl_options.context
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert parameters.ssl_options.server_hostname == "rabbit.example.org"
    assert (parameters.host, parameters.port, parameters.virtual_host, parameters.heartbeat) == (
        "rabbit.example.org", 5671, "/cvmfs", 30)
    other_name = amqp.connection_parameters(dict(SETTINGS, server_hostname="broker.internal", **certificates), "pw")
    assert other_name.ssl_options.server_hostname == "broker.internal"


def test_plain_connection_and_headers():
    parameters = amqp.connection_parameters(dict(SETTINGS, tls=False, port=5672), "pw")
    assert parameters.ssl_options is None and parameters.credentials.password == "pw"
    properties = pika.BasicProperties(headers={amqp.ATTEMPTS_HEADER: 3, amqp.NOT_BEFORE_HEADER: 1500})
    assert (amqp.attempts_of(properties), amqp.not_before_of(properties)) == (3, 1.5)
    garbage = pika.BasicProperties(headers={amqp.ATTEMPTS_HEADER: "x", amqp.NOT_BEFORE_HEADER: b"y"})
    assert (amqp.attempts_of(garbage), amqp.not_before_of(garbage)) == (0, 0.0)
    assert (amqp.attempts_of(None), amqp.not_before_of(pika.BasicProperties())) == (0, 0.0)


def test_fallback_nodes_are_tried_after_the_first_host():
    candidates = amqp.connection_candidates(dict(SETTINGS, tls=False, fallback_hosts=["rabbit2:5672",
                                                                                      "10.0.0.3:5673"]), "pw")
    assert [(p.host, p.port) for p in candidates] == [("rabbit.example.org", 5671), ("rabbit2", 5672),
                                                       ("10.0.0.3", 5673)]
    assert len(amqp.connection_candidates(dict(SETTINGS, tls=False), "pw")) == 1


def test_a_refused_broker_certificate_says_what_to_set():
    refused = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
                                              "unable to get local issuer certificate (_ssl.c:1006)")
    text = amqp.connection_error_text(refused)
    assert text.startswith("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer")
    assert "set amqp.ca_cert to the CA bundle that signs it and amqp.host (or amqp.server_hostname)" in text
    assert amqp.connection_error_text(ConnectionRefusedError(111, "Connection refused")) == "[Errno 111] Connection " \
        "refused"
