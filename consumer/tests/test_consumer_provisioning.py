"""Provisioning through the registry (provisioning.py, registry.py) with the fake broker: requests checked and added to
the registry stream, the registry replayed on every connection, failed provisioning runs retried here."""
import json
import shutil
from pathlib import Path


from fakes import REGISTRY, event, settle


def test_malformed_provisioning_message_is_dead_lettered_with_reason(daemon):
    daemon.broker.deliver("publisher", b"alice,sub,alice.infn.it")
    [(action, queue, _body, (reason, attempts))] = daemon.broker.settled
    assert (action, queue, attempts) == ("dead-letter", "publisher", 0)
    assert "4 comma-separated fields" in reason
    daemon._start_ready()
    assert daemon.runner.runs == []


def test_provisioning_runs_the_playbook_then_consumes_the_new_queue(daemon):
    daemon.broker.queues.add("carol")
    daemon.broker.deliver("publisher", b"carol,sub-c,carol.infn.it,P")
    daemon._start_ready()
    settle(daemon)
    assert daemon.runner.runs == [("provision_playbook", {"cvmfs_repository": "carol.infn.it",
                                                          "cvmfs_subject": "sub-c"})]
    assert daemon.broker.actions() == [("forward", "publisher")]
    assert daemon.broker.streams[REGISTRY] == [b"carol,sub-c,carol.infn.it,P"]
    assert "carol" in daemon.broker.callbacks
    daemon.broker.deliver("carol", event("cvmfs/x", bucket="carol"))
    daemon._start_ready()
    settle(daemon)
    assert daemon.runner.runs[-1] == ("sync_playbook", {"cvmfs_repository": "carol.infn.it",
                                                        "cvmfs_sync_mode": "changes", "cvmfs_sync_keys": ["cvmfs/x"]})


def test_the_registry_is_replayed_on_connect_and_only_what_is_missing_here_runs(daemon):
    carol = b'{"version": 1, "repository": "carol.infn.it", "kind": "personal", "subject": "sub-c"}'
    daemon.broker.queues.add("carol")
    daemon.broker.streams[REGISTRY] += [carol, b"dave,sub-d,dave.infn.it,P", b"x,y,z.example.org,P", carol]
    daemon.broker.callbacks.clear()
    daemon._connect()                               # what a host joining later (or reconnecting) does
    daemon._start_ready()
    settle(daemon, runs=2)
    ran = sorted(extravars["cvmfs_repository"] for _playbook, extravars in daemon.runner.runs)
    assert ran == ["carol.infn.it", "dave.infn.it"]  # once each; the invalid entry is skipped
    assert "carol" in daemon.broker.callbacks
    assert daemon.broker.actions(registry=True).count(("ack", REGISTRY)) == 4
    config_dir = Path(daemon.config["repositories.config_dir"])
    for fqrn in ("carol.infn.it", "dave.infn.it"):  # what the playbook would have created
        (config_dir / fqrn).mkdir()
    daemon.broker.callbacks.clear()
    daemon._connect()
    daemon._start_ready()
    assert len(daemon.runner.runs) == 2             # applied and present: nothing runs again
    shutil.rmtree(config_dir / "dave.infn.it")
    daemon.broker.callbacks.clear()
    daemon._connect()
    daemon._start_ready()
    settle(daemon)
    assert daemon.runner.runs[-1][1]["cvmfs_repository"] == "dave.infn.it"   # lost here: provisioned again
    assert json.loads((Path(daemon.config["state_dir"]) / "registry.json").read_text())["applied"].keys() == {
        "carol.infn.it", "dave.infn.it"}


def test_a_failed_provisioning_is_retried_here_and_never_dead_lettered(daemon):
    daemon.runner.outcomes = ["failed", "failed"]
    daemon.broker.deliver("publisher", b"carol,sub-c,carol.infn.it,P")
    for _ in range(3):
        daemon._start_ready()
        settle(daemon)
        daemon.clock_value[0] += 3600               # past any backoff
    assert [playbook for playbook, _extravars in daemon.runner.runs].count("provision_playbook") == 3
    assert daemon.broker.actions() == [("forward", "publisher")]
    assert "carol.infn.it" in daemon.registry.applied


def test_what_was_applied_here_is_applied_again_periodically_and_a_change_is_drift(daemon, caplog):
    """Every provisioning.reapply_interval each request applied here runs again; a run that changed something (a
    topic re-pointed or deleted behind the publisher's back) is logged and counted as drift; a re-apply never holds
    the repository's queue back, even when it fails."""
    daemon.broker.queues.add("carol")
    daemon.broker.deliver("publisher", b"carol,sub-c,carol.infn.it,P")
    daemon._start_ready()
    settle(daemon)
    (Path(daemon.config["repositories.config_dir"]) / "carol.infn.it").mkdir()   # what the playbook created
    stored = json.loads((Path(daemon.config["state_dir"]) / "registry.json").read_text())["requests"]
    assert stored == {"carol.infn.it": {"repository": "carol.infn.it", "subject": "sub-c", "group": None,
                                        "owner": "carol", "form": "csv"}}
    interval = daemon.config["provisioning.reapply_interval"]
    assert interval == 3600
    daemon.scheduler.full_interval = 0   # no periodic full sync in between: only provisioning runs here
    daemon.provisioning.reapply_due(daemon.clock())
    daemon._start_ready()
    assert len(daemon.runner.runs) == 1, "no re-apply right after start"

    def reapply(stats=None, outcome="successful"):
        daemon.clock_value[0] += interval
        daemon.runner.stats = [stats or {}]
        daemon.runner.outcomes = [outcome]
        daemon.provisioning.reapply_due(daemon.clock())
        daemon._start_ready()
        assert not daemon.status.provisioning_unfinished("carol.infn.it"), "a re-apply holds nothing back"
        settle(daemon)
        assert daemon.runner.runs[-1] == ("provision_playbook", {"cvmfs_repository": "carol.infn.it",
                                                                 "cvmfs_subject": "sub-c"})

    def drift():
        return daemon.metrics.provisioning_drift.labels("carol.infn.it")._value.get()

    reapply({"changed": {"localhost": 0}, "ok": {"localhost": 9}})
    assert len(daemon.runner.runs) == 2 and drift() == 0
    reapply({"changed": {"localhost": 2}, "ok": {"localhost": 9}})
    assert drift() == 1
    [line] = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "provisioning_drift"]
    assert line.getMessage().startswith("provisioning of carol.infn.it had drifted: its re-apply changed 2 thing(s)")
    reapply(outcome="failed")
    assert not daemon.status.provisioning_unfinished("carol.infn.it") and "carol" in daemon.broker.callbacks
    assert drift() == 1


def test_no_reapply_when_the_interval_is_zero_or_the_repository_is_gone(daemon):
    daemon.scheduler.full_interval = 0
    daemon.broker.deliver("publisher", b"carol,sub-c,carol.infn.it,P")
    daemon._start_ready()
    settle(daemon)
    for _ in range(2):   # carol's repository does not exist here (the fake playbook created nothing)
        daemon.clock_value[0] += 3600
        daemon.provisioning.reapply_due(daemon.clock())
        daemon._start_ready()
    assert len(daemon.runner.runs) == 1
    (Path(daemon.config["repositories.config_dir"]) / "carol.infn.it").mkdir()
    daemon.provisioning.reapply_interval = 0
    daemon.clock_value[0] += 7200
    daemon.provisioning.reapply_due(daemon.clock())
    daemon._start_ready()
    assert len(daemon.runner.runs) == 1


def test_requests_applied_by_an_older_daemon_are_kept_when_the_registry_is_replayed(daemon):
    """registry.json of a daemon that kept no requests: the replay on connect keeps them (no run), so they are
    re-applied from then on."""
    state = Path(daemon.config["state_dir"]) / "registry.json"
    daemon.broker.deliver("publisher", b"carol,sub-c,carol.infn.it,P")
    daemon._start_ready()
    settle(daemon)
    (Path(daemon.config["repositories.config_dir"]) / "carol.infn.it").mkdir()
    state.write_text(json.dumps({"applied": json.loads(state.read_text())["applied"]}))   # as an older daemon wrote it
    from cvmfs_publisher_consumer.registry import Registry
    daemon.registry = daemon.provisioning.registry = Registry(daemon.config["state_dir"],
                                                              daemon.config["repositories.config_dir"])
    daemon.broker.callbacks.clear()
    daemon._connect()
    daemon._start_ready()
    assert len(daemon.runner.runs) == 1, "applied and present: nothing runs"
    assert json.loads(state.read_text())["requests"]["carol.infn.it"]["subject"] == "sub-c"
    daemon.scheduler.full_interval = 0
    daemon.clock_value[0] += 3600
    daemon.provisioning.reapply_due(daemon.clock())
    daemon.clock_value[0] += 3600
    daemon.provisioning.reapply_due(daemon.clock())
    daemon._start_ready()
    settle(daemon)
    assert daemon.runner.runs[-1] == ("provision_playbook", {"cvmfs_repository": "carol.infn.it",
                                                             "cvmfs_subject": "sub-c"})


def test_a_kept_request_is_not_written_again_for_the_same_request_in_another_form(tmp_path):
    """The registry stream can hold one request as CSV and as JSON: the same request, kept once (a replay on every
    connection must not rewrite registry.json for it)."""
    from dataclasses import replace

    from cvmfs_publisher_consumer.messages import ProvisionRequest
    from cvmfs_publisher_consumer.registry import Registry
    registry = Registry(str(tmp_path), str(tmp_path / "repositories.d"))
    csv = ProvisionRequest(repository="carol.infn.it", subject="sub-c", owner="carol", form="csv")
    registry.finished(csv, succeeded=True)
    state = tmp_path / "registry.json"
    written = state.stat().st_ino   # registry.json is replaced (a new file) on every write
    registry.remember(replace(csv, form="json"))
    assert state.stat().st_ino == written and registry.requests["carol.infn.it"]["form"] == "csv"
    registry.remember(replace(csv, subject="sub-other"))   # not the request applied here: not kept
    assert registry.requests["carol.infn.it"]["subject"] == "sub-c"
    del registry.requests["carol.infn.it"]
    registry.remember(replace(csv, form="json"))   # applied by an older daemon that kept none: kept now
    assert registry.requests["carol.infn.it"]["form"] == "json" and state.stat().st_ino != written
