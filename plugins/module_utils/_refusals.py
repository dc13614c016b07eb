# -*- coding: utf-8 -*-
# Copyright: contributors to infn_cloud.cvmfs_publisher
# Apache License 2.0
"""Objects the publisher will not publish as they are: remembered per ETag, reported to the uploader.

FOR INTERNAL COLLECTION USE ONLY. This file may change without notice.

A refusal is a per-object outcome, never a failed run: the run publishes everything else. It is remembered in
``<state_dir>/<fqrn>.refused.json`` with the object's ETag, so the same bytes are not downloaded and judged
again on every run; a new upload (another ETag), a deletion, or a rule that now accepts the key clears it.

Kinds (``category``, the daemon's counter label): ``key`` (a key the naming rules refuse), ``conflict`` (a path
that clashes with another object), ``tarball`` (a refused member), ``limit`` (over a tarball limit),
``corrupt`` (not a readable tar archive), ``ingest`` (the gateway's ingest refused the tarball).

The uploader's report (``report_json``) lists the current refusals; ``_sync`` writes it into the bucket, outside
the published prefix, after every run that refused or cleared something.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import os

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._files import write_atomically

KEY = "key"
CONFLICT = "conflict"
INGEST = "ingest"
FORMAT_VERSION = 1
DEFAULT_REPORT_KEY = ".cvmfs-publisher/report.json"
# Refusals the plan recomputes on every run from the keys alone: not worth remembering per ETag to skip work,
# but still listed (and reported) while the object is there.
RECOMPUTED = (KEY, CONFLICT)


class Refusals:
    """The remembered refusals of one repository, and what this run changed about them."""

    def __init__(self, remembered=None):
        self.entries = dict(remembered or {})  # key -> {"etag", "reason", "category", "since"}
        self.new = []        # entries refused for the first time (or for new content) in this run
        self.cleared = []    # keys whose refusal this run lifted
        self.skipped = 0     # changes not even downloaded: refused before with the same ETag

    def refuse(self, key, etag, reason, category, now):
        """Record a refusal; it counts as new unless the same content was already refused for the same reason."""
        old = self.entries.get(key)
        if old and old["etag"] == (etag or "") and old["reason"] == reason:
            return
        entry = {"etag": etag or "", "reason": reason, "category": category, "since": now}
        self.entries[key] = entry
        self.new.append(dict(entry, key=key))

    def clear(self, key):
        if self.entries.pop(key, None) is not None:
            self.cleared.append(key)

    def known(self, key, etag):
        """True when ``key`` with this ETag was refused before for its content (so need not be tried again)."""
        entry = self.entries.get(key)
        return bool(entry) and entry["category"] not in RECOMPUTED and entry["etag"] == (etag or "")

    def skip_known(self, plan):
        """Drop the plan's adds and updates of objects already refused with the same ETag (not downloaded)."""
        kept = []
        for change in plan.changes:
            if change.op != "delete" and self.known(change.key, change.etag):
                self.skipped += 1
                continue
            kept.append(change)
        plan.changes = kept

    def settle(self, plan, observed, complete, now):
        """After planning: the plan's own refusals (keys, conflicts) are recorded; a refusal is cleared when its
        object is gone (``observed`` maps key -> etag or None), changed and no longer refused, or, in a
        ``complete`` (full) run, not listed at all."""
        refused_now = set()
        for item in plan.refused:
            category = item.get("category") or CONFLICT
            refused_now.add(item["key"])
            self.refuse(item["key"], observed.get(item["key"]), item["reason"], category, now)
        for key in list(self.entries):
            if key in refused_now:
                continue
            entry = self.entries[key]
            if key in observed:
                etag = observed[key]
                if etag is None or entry["category"] in RECOMPUTED or etag != entry["etag"]:
                    self.clear(key)
            elif complete:
                self.clear(key)

    @property
    def changed(self):
        return bool(self.new or self.cleared)

    def current(self):
        return [dict(entry, key=key) for key, entry in sorted(self.entries.items())]

    def result(self, limit):
        """The module result's ``refusals``: what the daemon logs, counts and shows in its status."""
        return dict(count=len(self.entries), current=self.current()[:limit], new=self.new[:limit],
                    cleared=self.cleared[:limit], skipped=self.skipped)


def report_json(fqrn, bucket, prefix, refusals, now):
    """The uploader's report: why objects of this bucket are not (or not in their new version) in /cvmfs."""
    objects = [dict(key=item["key"], etag=item["etag"], reason=item["reason"], kind=item["category"],
                    since=_iso(item["since"])) for item in refusals.current()]
    return json.dumps(dict(version=FORMAT_VERSION, repository=fqrn, bucket=bucket, prefix=prefix, generated=_iso(now),
                           explanation="These objects are not published in /cvmfs/%s as they are. Fix or delete "
                                       "an object to clear its entry; an unchanged object is not tried again."
                                       % fqrn,
                           refused=objects), indent=1, sort_keys=True) + "\n"


def _iso(timestamp):
    import time
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def check_report_key(report_key, prefix):
    """The report must not be published nor notified: refuse a report key under the published prefix."""
    if report_key and prefix and report_key.startswith(prefix):
        return "report_key %r is under the published prefix %r: it would be published and notified" % (
            report_key, prefix)
    return None


class RefusalStore:
    """``<state_dir>/<fqrn>.refused.json``; a missing or unreadable file means nothing remembered (the objects
    are then judged again: costs a re-check, never a wrong repository)."""

    def __init__(self, state_dir, fqrn, identity):
        self.path = os.path.join(state_dir, fqrn + ".refused.json")
        self.identity = identity

    def load(self):
        try:
            with open(self.path, "r") as handle:
                data = json.load(handle)
        except (IOError, OSError, ValueError):
            return Refusals(), {}
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION or data.get("identity") != self.identity:
            return Refusals(), {}
        entries = {}
        for key, entry in (data.get("objects") or {}).items():
            if isinstance(entry, dict) and {"etag", "reason", "category", "since"} <= set(entry):
                entries[key] = entry
        return Refusals(entries), dict(report_digest=data.get("report_digest"))

    def save(self, refusals, report_digest=None):
        text = json.dumps(dict(version=FORMAT_VERSION, identity=self.identity, objects=refusals.entries,
                               report_digest=report_digest), sort_keys=True)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        write_atomically(self.path, text)
