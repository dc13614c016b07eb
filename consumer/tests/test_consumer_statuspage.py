"""The status page: what it shows from a status file, escaping, and the HTTP headers it is served with."""
import socket
import urllib.request

from cvmfs_publisher_consumer.metrics import Metrics
from cvmfs_publisher_consumer.statuspage import render

NOW = 1_800_000_000.0
STATUS = {
    "host": "pub-01", "pid": 42, "connected": True, "updated": NOW - 5, "runs_in_progress": 1,
    "consuming": ["alice.infn.it"], "queues": {"publisher": "publisher", "dead_letter": "cvmfs-publisher.dlq"},
    "queue_depths": {"publisher": 0, "cvmfs-publisher.dlq": 4, "alice": 7, "bob": None},
    "repositories": {
        "alice.infn.it": {"last_publish": NOW - 30, "refusals": [{"key": "cvmfs/../x", "reason": "'..' segment"}]},
        "bob.infn.it": {"last_error": "Publish: <script>alert(1)</script>", "last_error_at": NOW - 600,
                        "active_host": "pub-02"},
    },
}


def test_the_page_shows_each_repository_its_depth_publish_error_refusals_and_host():
    page = render(STATUS, NOW).decode()
    alice = page[page.index("<td>alice.infn.it</td>"):].split("</tr>")[0]
    assert '<td class="num">7</td>' in alice and "(30s ago)" in alice
    assert "cvmfs/../x: &#x27;..&#x27; segment" in alice and "pub-01 (this daemon)" in alice
    bob = page[page.index("<td>bob.infn.it</td>"):].split("</tr>")[0]
    assert '<td class="num">?</td>' in bob and "pub-02" in bob and "(10min ago)" in bob
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in bob and "<script" not in page
    assert 'http-equiv="refresh"' in page and "connected to RabbitMQ" in page
    assert 'dead-letter queue <code>cvmfs-publisher.dlq</code>: <span class="bad">4</span>' in page
    assert "http://" not in page and "https://" not in page and "src=" not in page


def test_the_page_without_a_status_file_says_so():
    page = render(None, NOW).decode()
    assert "no repository yet" in page and "not connected to RabbitMQ" in page


def test_refusals_beyond_those_listed_are_counted():
    listed = [{"key": "cvmfs/k%d" % i, "reason": "hostile", "category": "key"} for i in range(7)]
    status = {"repositories": {"alice.infn.it": {"refusals": listed, "refusals_count": 12}}}
    page = render(status, NOW).decode()
    assert "<li>cvmfs/k4: hostile</li>" in page and "cvmfs/k5" not in page
    assert "<li>… and 7 more</li>" in page
    status = {"repositories": {"alice.infn.it": {"refusals": [], "refusals_count": 3}}}
    assert '<span class="warn">3</span>' in render(status, NOW).decode()


def test_the_page_is_served_at_the_root_with_a_strict_policy():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = Metrics().serve("127.0.0.1", port, page=lambda: render(STATUS, NOW))
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/" % port, timeout=5) as response:
            body = response.read().decode()
            assert response.headers["Content-Type"] == "text/html; charset=utf-8"
            assert response.headers["Content-Security-Policy"] == "default-src 'none'; style-src 'unsafe-inline'"
        assert "alice.infn.it" in body
    finally:
        server.shutdown()
