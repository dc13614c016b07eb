"""The daemon's status page in a real browser: headless Chromium (Debian's ``chromium``) loads ``/`` from a daemon
serving the local stack, and both the rendered DOM and a screenshot are taken.

The DOM must name every repository the daemon consumes, with a publish time for the one that published and the
dead-letter queue's depth; the screenshot must be a real PNG of the page. ``STATUS_PAGE_SCREENSHOT=<path>`` keeps
the screenshot (that is how docs/status-page.png is made).
"""
import os
import shutil
import struct
import subprocess
import time
import urllib.request

import pytest

from helpers import consumer_e2e

e2e = consumer_e2e()
daemons = e2e.daemons   # the fixture: daemons with this test's own queues, checked for secrets when they stop

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_TIMEOUT = 180

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not CHROMIUM, reason="needs Debian's chromium (make apt)")]


def chromium(tmp_path, *args):
    """Chromium headless with a fresh profile and nothing that phones home."""
    profile = tmp_path / ("profile-%d" % time.monotonic_ns())
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            "--user-data-dir=%s" % profile, *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=BROWSER_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_the_status_page_shows_every_repository_in_a_real_browser(stack, s3, daemons, unique_name, tmp_path):
    daemon = daemons(include=["%s*.infn.it" % unique_name]).start()
    first = e2e.provision(stack, s3, daemon, unique_name)
    second = e2e.provision(stack, s3, daemon, unique_name + "-data")
    s3.put_object(Bucket=unique_name, Key="cvmfs/hello.txt", Body=b"hello\n")
    e2e.wait_published(stack, s3, first, unique_name)
    e2e.publish(stack, daemons.queues["publisher"], "broken message")   # one dead letter to show
    daemon.wait_for(lambda e: e.get("event") == "dead_letter", "the broken message was not dead-lettered")

    url = "http://127.0.0.1:%d/" % daemon.metrics_port
    deadline = time.monotonic() + 60   # the queue depths are probed every 15 s
    while True:
        with urllib.request.urlopen(url, timeout=10) as response:
            served = response.read().decode()
        if ">1</span> waiting" in served or time.monotonic() > deadline:
            break
        time.sleep(1)

    dom = chromium(tmp_path, "--dump-dom", url)
    for fqrn in (first, second):
        row = dom[dom.index("<td>%s</td>" % fqrn):].split("</tr>")[0]
        assert "(this daemon)" in row, row
    published_row = dom[dom.index("<td>%s</td>" % first):].split("</tr>")[0]
    assert "never" not in published_row and "s ago)" in published_row, published_row
    assert "dead-letter queue <code>%s</code>: <span class=\"bad\">1</span> waiting" % daemons.queues["dlq"] in dom
    assert "connected to RabbitMQ" in dom and "not connected" not in dom
    for secret in e2e.stack_secrets(stack):
        assert secret not in dom

    screenshot = tmp_path / "status-page.png"
    chromium(tmp_path, "--window-size=1100,420", "--screenshot=%s" % screenshot, url)
    width, height = png_size(screenshot)
    assert (width, height) == (1100, 420)
    assert screenshot.stat().st_size > 10_000, "a blank screenshot"
    keep = os.environ.get("STATUS_PAGE_SCREENSHOT")
    if keep:
        shutil.copyfile(screenshot, keep)

