"""_rgw/transport.py: its SigV4 signatures are botocore's, byte for byte (hypothesis over keys, queries, endpoints
and session tokens), and its connections behave against a real HTTP server on loopback: kept alive, replaced once
when the server closed them while idle, and every failure raised as botocore's exception with the operator message
of ``client.describe_client_error``."""
import datetime
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace
from unittest import mock

import botocore.auth
import botocore.credentials
import pytest
from botocore import exceptions as bex
from botocore.awsrequest import AWSRequest
from botocore.httpsession import URLLib3Session
from hypothesis import given, settings
from hypothesis import strategies as st

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._module import PublisherError
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw import transport
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw.client import (
    ClientError,
    Connection,
    describe_client_error,
    environ_proxies,
    is_retryable,
)
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw.objects import (
    BucketObjects,
    TransferError,
)

NOW = datetime.datetime(2026, 12, 3, 17, 5, 9)


def botocore_headers(method, url, credentials, region, now):
    """What botocore's S3SigV4Auth adds to the same request."""
    request = AWSRequest(method=method, url=url, data=b"" if method != "GET" else None)
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=now):
        botocore.auth.S3SigV4Auth(credentials, "s3", region).add_auth(request)
    return {name: request.headers.get(name) for name in ("Authorization", "X-Amz-Date", "X-Amz-Content-SHA256",
                                                         "X-Amz-Security-Token")}


def ours(method, url, credentials, region, now):
    headers = transport.Signer(region).headers(method, url, credentials, now=now)
    return {name: headers.get(name) for name in ("Authorization", "X-Amz-Date", "X-Amz-Content-SHA256",
                                                 "X-Amz-Security-Token")}


def url_of(endpoint, bucket, key=None, query=None):
    """The URL ``BucketObjects`` sends for this bucket, key and query."""
    return BucketObjects(bucket, connect=lambda: SimpleNamespace(endpoint_url=endpoint))._url(key, query)


ENDPOINTS = st.sampled_from(["http://127.0.0.1:19000", "https://rgw.example.org", "https://rgw.example.org:443",
                             "http://rgw.example.org:80/", "https://[::1]:8443", "http://localhost:7480"])
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(endpoint=ENDPOINTS, method=st.sampled_from(["GET", "HEAD", "DELETE"]),
       bucket=st.from_regex(r"[a-z0-9][a-z0-9.-]{2,20}", fullmatch=True), key=st.none() | TEXT,
       query=st.none() | st.dictionaries(st.sampled_from(["prefix", "continuation-token", "delimiter", "list-type",
                                                          "max-keys", "encoding-type", "notification"]), TEXT,
                                         max_size=5),
       token=st.none() | st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=60),
       region=st.sampled_from(["default", "us-east-1", "eu-central-1"]))
def test_the_signature_is_botocores(endpoint, method, bucket, key, query, token, region):
    credentials = botocore.credentials.Credentials("AKID-example", "secret/example+key", token)
    url = url_of(endpoint, bucket, key, query)
    expected = botocore_headers(method, url, credentials, region, NOW)
    assert ours(method, url, credentials.get_frozen_credentials(), region, NOW) == expected


def test_the_signing_key_follows_the_day_and_the_secret():
    signer = transport.Signer("default")
    url = url_of("http://127.0.0.1:1", "bucket", "cvmfs/a")
    for secret, now in (("one", NOW), ("one", NOW + datetime.timedelta(days=1)), ("two", NOW)):
        credentials = botocore.credentials.Credentials("AKID", secret)
        assert (signer.headers("GET", url, credentials, now=now)["Authorization"]
                == botocore_headers("GET", url, credentials, "default", now)["Authorization"])


SIGNED = ("Authorization", "X-Amz-Date", "X-Amz-Content-SHA256", "X-Amz-Security-Token", "Content-Type")


@settings(max_examples=200, deadline=None)
@given(endpoint=ENDPOINTS, body=st.binary(max_size=300), token=st.none() | st.text(
           st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=60),
       region=st.sampled_from(["default", "us-east-1"]),
       query=st.sampled_from(["", "?notification", "?notification=cvmfs-publisher"]),
       content_type=st.none() | st.sampled_from(["application/xml", "text/plain;  charset=utf-8"]))
def test_a_request_with_a_body_is_signed_as_botocore_signs_it(endpoint, body, token, region, query, content_type):
    """S3 (S3SigV4Auth: the payload's hash sent and signed) and RGW's SNS API (SigV4Auth: a form POST, its
    Content-Type signed), the payload hash being the body's."""
    credentials = botocore.credentials.Credentials("AKID-example", "secret/example+key", token)
    for service, method, url, auth in (
            ("s3", "PUT", endpoint.rstrip("/") + "/bucket" + query, botocore.auth.S3SigV4Auth),
            ("sns", "POST", endpoint.rstrip("/") + "/", botocore.auth.SigV4Auth)):
        request = AWSRequest(method=method, url=url, data=body,
                             headers={"Content-Type": content_type} if content_type else None)
        with mock.patch.object(botocore.auth, "get_current_datetime", return_value=NOW):
            auth(credentials, service, region).add_auth(request)
        headers = transport.Signer(region, service).headers(method, url, credentials.get_frozen_credentials(),
                                                             now=NOW, body=body, content_type=content_type)
        assert {name: headers.get(name) for name in SIGNED} == {name: request.headers.get(name) for name in SIGNED}


# ---------------------------------------------------------------------------------------------------------------
# Against a real HTTP server on loopback


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    behaviour = "ok"  # set per server

    def log_message(self, *args):
        pass

    def _answer(self, status, body, close=False):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"etag"')
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        server = self.server
        server.requests.append((self.command, self.path, self.client_address[1], dict(self.headers)))
        behaviour = server.behaviour
        if behaviour == "ok":
            self._answer(200, b"x" * 5000)
        elif behaviour == "close-after":
            self._answer(200, b"body", close=True)
            self.close_connection = True
        elif behaviour == "drop-idle":
            self._answer(200, b"body")
            self.close_connection = True  # closes without saying so: the client's connection goes stale
        elif behaviour == "missing":
            self._answer(404, b"<Error><Code>NoSuchKey</Code><Message>gone</Message></Error>")
        elif behaviour == "short":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"y" * 10)
            self.close_connection = True
        elif behaviour == "slow":
            time.sleep(1.5)
            self._answer(200, b"late")
        elif behaviour == "hang-up":
            self.close_connection = True  # no answer at all

    do_HEAD = do_GET
    do_DELETE = do_GET


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.requests = []
    httpd.behaviour = "ok"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = "http://127.0.0.1:%d" % httpd.server_address[1]
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def get(tp, url, method="GET"):
    response = tp.send(method, url, {"X-Test": "1"})
    return response.status_code, response.load()


def test_requests_share_a_kept_alive_connection(server):
    tp = transport.Transport(server.url)
    for _ in range(5):
        assert get(tp, server.url + "/bucket/key") == (200, b"x" * 5000)
    assert get(tp, server.url + "/bucket/key", "HEAD") == (200, b"")
    assert len(set(port for _, _, port, _ in server.requests)) == 1
    assert server.requests[0][3]["User-Agent"] == transport.USER_AGENT
    tp.close()


def test_a_connection_the_server_closed_while_idle_is_replaced_once(server):
    server.behaviour = "drop-idle"
    tp = transport.Transport(server.url)
    for _ in range(3):
        assert get(tp, server.url + "/b/k") == (200, b"body")
        time.sleep(0.05)  # the server's close reaches us
    assert len(set(port for _, _, port, _ in server.requests)) == 3


def test_a_connection_close_answer_opens_a_new_connection(server):
    server.behaviour = "close-after"
    tp = transport.Transport(server.url)
    assert get(tp, server.url + "/b/k") == (200, b"body")
    assert get(tp, server.url + "/b/k") == (200, b"body")
    assert len(server.requests) == 2


def test_a_streamed_body_given_up_early_closes_its_connection(server):
    tp = transport.Transport(server.url)
    response = tp.send("GET", server.url + "/b/k", {})
    assert response.raw.read(10) == b"x" * 10
    response.raw.release_conn()  # not read to its end: the connection cannot serve another request
    assert tp._idle == []
    assert get(tp, server.url + "/b/k")[0] == 200
    assert len(set(port for _, _, port, _ in server.requests)) == 2


def test_a_truncated_body_is_a_connection_closed_error(server):
    server.behaviour = "short"
    tp = transport.Transport(server.url)
    response = tp.send("GET", server.url + "/b/k", {})
    with pytest.raises(bex.ConnectionClosedError) as caught:
        while response.raw.read(4):
            pass
    assert is_retryable(caught.value)
    assert "Connection was closed before we received a valid response" in describe_client_error(
        caught.value, "download s3://b/k")


def test_a_server_that_hangs_up_without_answering(server):
    server.behaviour = "hang-up"
    tp = transport.Transport(server.url)
    with pytest.raises(bex.ConnectionClosedError) as caught:
        tp.send("GET", server.url + "/b/k", {})
    assert is_retryable(caught.value)


def test_a_read_timeout(server):
    server.behaviour = "slow"
    tp = transport.Transport(server.url, read_timeout=0.3)
    with pytest.raises(bex.ReadTimeoutError) as caught:
        tp.send("GET", server.url + "/b/k", {})
    assert is_retryable(caught.value)
    assert describe_client_error(caught.value, "download s3://b/k").startswith(
        "RGW unreachable at %s while trying to download s3://b/k: Read timeout" % server.url)


def test_nobody_listening():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = "http://127.0.0.1:%d" % sock.getsockname()[1]
    tp = transport.Transport(url)
    with pytest.raises(bex.EndpointConnectionError) as caught:
        tp.send("GET", url + "/b/k", {})
    assert is_retryable(caught.value)
    assert describe_client_error(caught.value, "list s3://b/cvmfs/").startswith(
        "RGW unreachable at %s while trying to list s3://b/cvmfs/: Could not connect" % url)


def params(url, tmp_path):
    (tmp_path / "access").write_text("AKID\n")
    (tmp_path / "secret").write_text("SECRET\n")
    return dict(endpoint_url=url, access_key_file=str(tmp_path / "access"),
                secret_key_file=str(tmp_path / "secret"), region="default", validate_certs=True)


def test_connection_signs_and_sends_and_reads_an_error_answer(server, tmp_path, monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    rgw = Connection(params(server.url, tmp_path))
    assert rgw.signed_request("GET", server.url + "/b/k", "GetObject").content == b"x" * 5000
    headers = server.requests[-1][3]
    assert headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKID/")
    assert "SECRET" not in repr(headers)
    server.behaviour = "missing"
    for stream in (False, True):
        with pytest.raises(ClientError) as caught:
            rgw.signed_request("GET", server.url + "/b/k", "GetObject", stream=stream)
        assert describe_client_error(caught.value, "download s3://b/k") == (
            "RGW failed to download s3://b/k: NoSuchKey: gone (HTTP 404)")
    assert isinstance(rgw._http_session(), transport.Transport)


def test_a_proxy_keeps_botocores_http_stack(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert isinstance(Connection(params("http://rgw.example.org:7480", tmp_path))._http_session(), URLLib3Session)


def test_static_keys_never_import_botocores_session_or_http_stack(server, tmp_path):
    """The tenth of a second of imports a sync run (or rgw_topic, rgw_bucket_notification) no longer pays: checked
    in a fresh interpreter."""
    script = (
        "import sys, json\n"
        "from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils import _sync\n"
        "from ansible_collections.infn_cloud.cvmfs_publisher.plugins.modules import rgw_topic\n"
        "from ansible_collections.infn_cloud.cvmfs_publisher.plugins.modules import rgw_bucket_notification\n"
        "from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._rgw.client import Connection\n"
        "rgw = Connection(json.loads(sys.argv[1]))\n"
        "assert rgw.signed_request('GET', sys.argv[2], 'GetObject').content == b'x' * 5000\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'urllib3', 's3transfer')\n"
        "             or m in ('botocore.session', 'botocore.config', 'botocore.httpsession', 'botocore.auth')))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", script, json.dumps(params(server.url, tmp_path)),
                          server.url + "/b/k"], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_static_credentials_never_show_the_secret():
    credentials = transport.Credentials("AKID", "the-secret", "the-token")
    assert "the-secret" not in repr(credentials) and "the-token" not in repr(credentials)
    assert "the-secret" not in str(credentials)


def test_no_proxy_covers_the_endpoint(monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "rgw.example.org")
    assert environ_proxies("http://rgw.example.org:7480") == {}
    assert environ_proxies("http://other.example.org:7480")["http"] == "http://proxy.invalid:3128"


def test_a_missing_ca_bundle_is_a_clear_error(tmp_path):
    rgw = Connection(dict(params("https://127.0.0.1:1", tmp_path), ca_bundle=str(tmp_path / "no-such-ca.pem")))
    with pytest.raises(PublisherError) as caught:
        rgw.signed_request("GET", "https://127.0.0.1:1/b/k", "GetObject")
    assert caught.value.msg == ("cannot set up TLS for RGW at https://127.0.0.1:1 with ca_bundle %s: No such file or "
                                "directory" % (tmp_path / "no-such-ca.pem"))


def test_an_ipv6_endpoint_without_a_port_connects_to_the_schemes_port():
    assert (transport.Transport("http://[::1]").host, transport.Transport("http://[::1]").port) == ("::1", 80)
    assert transport.Transport("https://[2001:db8::10]", verify=False).port == 443


def test_idle_connections_the_server_closed_are_all_skipped(server):
    """A pool full of connections the server closed while idle (its keep-alive timeout): the next request still
    succeeds at its first attempt, however many there are."""
    server.behaviour = "drop-idle"
    tp = transport.Transport(server.url, max_idle=16)
    responses = [tp.send("GET", server.url + "/b/k", {}) for _ in range(16)]
    for response in responses:
        assert response.load() == b"body"
    assert len(tp._idle) == 16
    time.sleep(0.1)  # the server's closes reach us
    assert get(tp, server.url + "/b/k") == (200, b"body")


def test_a_ca_bundle_is_the_only_trust(tmp_path):
    """As with botocore: a ca_bundle replaces the trust store, it does not add to it."""
    end = "-----END CERTIFICATE-----\n"
    (tmp_path / "one.pem").write_text(open(transport.default_ca_bundle()).read().split(end)[0] + end)
    assert transport.tls_context(str(tmp_path / "one.pem")).cert_store_stats()["x509_ca"] == 1


@pytest.mark.parametrize("endpoint", ["rgw.example.org:7480", "ftp://rgw.example.org", "http://"])
def test_an_endpoint_that_is_not_an_http_url_is_named_as_such(endpoint, tmp_path, monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(PublisherError) as caught:
        Connection(params(endpoint, tmp_path)).signed_request("GET", endpoint + "/b/k", "GetObject")
    assert caught.value.msg == ("cannot send requests to RGW: endpoint_url %s is not an http:// or https:// URL"
                                % endpoint)


def test_head_makes_the_connection_once_for_all_its_threads(server, tmp_path, monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    made = []

    def connect():
        time.sleep(0.05)  # a slow start-up: threads that each made a Connection would all get here
        made.append(Connection(params(server.url, tmp_path)))
        return made[-1]

    objects = BucketObjects("b", connect=connect, concurrency=16)
    observations = objects.head(["cvmfs/k%02d" % i for i in range(40)], concurrency=16)
    assert [obs.size for obs in observations] == [5000] * 40
    assert len(made) == 1


def test_a_staging_file_that_cannot_be_made_fails_the_object_and_gives_the_connection_up(server, tmp_path,
                                                                                            monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    rgw = Connection(params(server.url, tmp_path))
    objects = BucketObjects("b", connect=lambda: rgw)
    change = SimpleNamespace(key="cvmfs/k", etag=None, size=None)
    with pytest.raises(TransferError) as caught:
        objects.download(change, str(tmp_path / "no-such-folder"))
    assert caught.value.msg == ("download s3://b/cvmfs/k: cannot create a file in %s: No such file or directory"
                                % (tmp_path / "no-such-folder"))
    assert rgw._http_session()._idle == [], "the connection of an answer left unread is closed, not pooled"
    objects.download(change, str(tmp_path))  # and the next download works
    assert change.size == 5000
