"""The read-only status page served at ``/`` on the metrics port: one self-contained HTML document.

Built only from the status file (what ``cvmfs-publisher status`` reads too), so it shows exactly what the daemon
wrote and nothing else: queue depths, last publish, last error, refusals, which host is active. No scripts, no
external assets (inline CSS), refreshed by ``<meta http-equiv="refresh">``; every value is HTML-escaped. The status
file holds no secret (error texts are the runner's redacted summaries), so neither does the page.
"""
import datetime
import html
from typing import Dict, Iterable, Optional

REFRESH_SECONDS = 10
MAX_REFUSALS_SHOWN = 5

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#1d1d1f;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .3em}
p.daemon{margin:.2em 0 1em;color:#444}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{border:1px solid #ddd;padding:.35em .6em;text-align:left;vertical-align:top;font-size:.92em}
th{background:#eef1f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1a7f37}.bad{color:#b42318}.warn{color:#9a6700}.muted{color:#777}
ul{margin:0;padding-left:1.1em}
"""


def _when(timestamp, now) -> str:
    if not timestamp:
        return "never"
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    ago = max(0, int(now - timestamp))
    if ago < 120:
        return "%s (%ds ago)" % (moment, ago)
    if ago < 7200:
        return "%s (%dmin ago)" % (moment, ago // 60)
    return "%s (%dh ago)" % (moment, ago // 3600)


def _cell(text, css: str = "") -> str:
    attribute = ' class="%s"' % css if css else ""
    return "<td%s>%s</td>" % (attribute, text)


def _depth(depths: Dict, queue: str) -> str:
    value = depths.get(queue)
    return "?" if value is None else str(value)


def _refusals(entry: Dict) -> str:
    """The refused objects of the last sync run, as the daemon records them: ``refusals`` (a list of
    {key, reason, ...}, possibly cut short) and ``refusals_count`` (how many there are in all)."""
    refusals = entry.get("refusals") or []
    if isinstance(refusals, dict):
        refusals = [refusals]
    count = entry.get("refusals_count", len(refusals))
    if not count:
        return '<span class="muted">none</span>'
    if not refusals:
        return '<span class="warn">%d</span>' % count
    items = []
    for refusal in list(refusals)[:MAX_REFUSALS_SHOWN]:
        if isinstance(refusal, dict):
            text = ": ".join(str(refusal[k]) for k in ("key", "reason") if refusal.get(k)) or str(refusal)
        else:
            text = str(refusal)
        items.append("<li>%s</li>" % html.escape(text))
    more = count - min(len(refusals), MAX_REFUSALS_SHOWN)
    if more > 0:
        items.append("<li>… and %d more</li>" % more)
    return '<ul class="warn">%s</ul>' % "".join(items)


def _active(entry: Dict, fqrn: str, consuming: Iterable[str], host: str) -> str:
    active = entry.get("active_host")
    if active:
        return html.escape(str(active))
    if fqrn in consuming:
        return "%s (this daemon)" % html.escape(host or "this host")
    return '<span class="muted">not consumed here</span>'


def repository_names(status: Dict) -> list:
    return sorted(set(status.get("repositories", {})) | set(status.get("consuming", [])))


def render(status: Optional[Dict], now: float) -> bytes:
    """The page for ``status`` (the parsed status file, or None when the daemon has not written one yet)."""
    status = status or {}
    depths = status.get("queue_depths") or {}
    queues = status.get("queues") or {}
    host = str(status.get("host", ""))
    consuming = set(status.get("consuming", []))
    connected = status.get("connected")
    state = '<span class="ok">connected to RabbitMQ</span>' if connected else \
        '<span class="bad">not connected to RabbitMQ</span>'
    daemon = "host %s, pid %s, %s, %s run(s) in progress, status written %s" % (
        html.escape(host or "?"), html.escape(str(status.get("pid", "?"))), state,
        html.escape(str(status.get("runs_in_progress", 0))), _when(status.get("updated"), now))
    extra = []
    for label, key in (("provisioning queue", "publisher"), ("dead-letter queue", "dead_letter")):
        name = queues.get(key)
        if name:
            css = "bad" if key == "dead_letter" and depths.get(name) else ""
            extra.append('%s <code>%s</code>: <span class="%s">%s</span> waiting' % (
                label, html.escape(name), css, _depth(depths, name)))
    rows = []
    for fqrn in repository_names(status):
        entry = status.get("repositories", {}).get(fqrn, {})
        error = entry.get("last_error")
        error_cell = ('<span class="bad">%s</span><br><span class="muted">%s</span>' % (
            html.escape(str(error)), _when(entry.get("last_error_at"), now))) if error else \
            '<span class="muted">-</span>'
        rows.append("<tr>%s%s%s%s%s%s</tr>" % (
            _cell(html.escape(fqrn)), _cell(_depth(depths, fqrn.split(".", 1)[0]), "num"),
            _cell(_when(entry.get("last_publish"), now)), _cell(error_cell), _cell(_refusals(entry)),
            _cell(_active(entry, fqrn, consuming, host))))
    if not rows:
        rows.append('<tr><td colspan="6" class="muted">no repository yet</td></tr>')
    document = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="%d">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cvmfs-publisher status</title><style>%s</style></head>
<body><h1>cvmfs-publisher</h1>
<p class="daemon">%s</p>
<p class="daemon">%s</p>
<table><thead><tr><th>repository</th><th>queued</th><th>last publish</th><th>last error</th>
<th>refusals</th><th>active on</th></tr></thead>
<tbody>
%s
</tbody></table>
<p class="muted">Read-only; refreshes every %d s. Page generated %s.</p>
</body></html>
""" % (REFRESH_SECONDS, STYLE, daemon, "; ".join(extra) or "&nbsp;", "\n".join(rows), REFRESH_SECONDS,
       _when(now, now).split(" (")[0])
    return document.encode("utf-8")
