"""Which repository queues the daemon consumes (subscriptions.py): discovery, missing or forbidden queues, a
half-provisioned repository held back, active positions given up to even out the spread over hosts."""
import time


from cvmfs_publisher_consumer.repositories import discover_repositories
from cvmfs_publisher_consumer.status import StatusFile
from fakes import REGISTRY, event, settle, started


def test_discovery_lists_valid_repositories(tmp_path):
    (tmp_path / "alice.infn.it").mkdir()
    (tmp_path / "not a repo").mkdir()
    (tmp_path / "file.infn.it").write_text("")
    (tmp_path / "bob.example.org").mkdir()
    assert discover_repositories(str(tmp_path), ["*.infn.it"]) == {"alice": "alice.infn.it"}
    assert len(discover_repositories(str(tmp_path))) == 2
    assert discover_repositories(str(tmp_path / "missing")) == {}


def test_consumes_the_provisioning_queue_the_registry_and_every_provisioned_repository(daemon):
    assert set(daemon.broker.callbacks) == {"publisher", REGISTRY, "alice", "bob"}
    # The dashboard's way in: the provisioning exchange, bound to the provisioning queue only.
    assert daemon.broker.bindings == {("cvmfs-publisher.provisioning", "publisher")}


def test_a_queue_that_cannot_be_consumed_is_reported_and_skipped(daemon, caplog):
    daemon.subscriptions.subscribe("forbidden.infn.it")
    daemon.subscriptions.subscribe("missing.infn.it")
    assert daemon.subscriptions.missing_queues == {"forbidden", "missing"}
    assert any("ACCESS_REFUSED" in record.getMessage() for record in caplog.records)
    assert set(daemon.broker.callbacks) == {"publisher", REGISTRY, "alice", "bob"}


def test_positions_above_the_fair_share_are_given_up_and_who_is_active_is_reported(daemon):
    from prometheus_client import generate_latest

    from cvmfs_publisher_consumer.spread import Looker, View
    me = daemon.host_id
    daemon.broker.queues |= {"carol", "dave"}
    for short in ("carol", "dave"):
        daemon.subscriptions.subscribe(short + ".infn.it")
    queues = ["alice", "bob", "carol", "dave"]
    view = View(active={q: me for q in queues}, standby={q: {"other"} for q in queues})

    class Management:
        def view(self):
            return view
    daemon.looker = Looker(Management(), interval=60)
    daemon.runner.auto = False
    daemon.broker.deliver("alice", event("cvmfs/a"))       # alice is busy: its position is not given up
    daemon._start_ready()
    started(daemon, 1)
    deadline = time.monotonic() + 10
    while not daemon.broker.released:                      # asks for the view (in the background), then acts on it
        assert time.monotonic() < deadline, "the view was never acted on"
        daemon._spread()
        time.sleep(0.01)
    assert daemon.broker.released == ["bob", "carol"]     # 4 of 4 with 2 hosts: 2 go, idle ones only
    assert {"bob", "carol"} <= set(daemon.broker.callbacks)  # subscribed again, as a standby
    status = StatusFile.read(daemon.config["state_dir"])
    assert status["host"] == me and status["active"] == ["alice.infn.it", "dave.infn.it"]
    assert status["standby"] == ["bob.infn.it", "carol.infn.it"] and status["hosts"] == {me: 2, "other": 0}
    assert status["repositories"]["alice.infn.it"]["active_host"] == me
    text = generate_latest(daemon.metrics.registry).decode()
    assert 'cvmfs_publisher_repository_active{repository="bob.infn.it"} 0.0' in text
    assert 'cvmfs_publisher_repository_active{repository="dave.infn.it"} 1.0' in text
    assert "cvmfs_publisher_positions_given_up_total 2.0" in text
    daemon.runner.gate.release()
    settle(daemon)


def test_a_half_made_repository_is_not_consumed_until_its_provisioning_succeeds(daemon, project):
    """Provisioning failed after the repository was created (say, the bucket did not exist yet): it shows in
    repositories.d, but its queue waits until the retry of the provisioning succeeds."""
    daemon.broker.queues.add("carol")
    daemon.runner.outcomes = ["failed"]
    daemon.broker.deliver("publisher", b"carol,sub-c,carol.infn.it,P")
    daemon._start_ready()
    settle(daemon)
    (project["tmp"] / "repositories.d" / "carol.infn.it").mkdir()
    daemon.subscriptions.rescan_now()
    daemon._rescan()
    assert "carol" not in daemon.broker.callbacks
    assert StatusFile.read(daemon.config["state_dir"])["repositories"]["carol.infn.it"]["provisioning"] == "failed"
    daemon.clock_value[0] += 3600  # past the backoff: the retry runs, and succeeds
    daemon._start_ready()
    settle(daemon)
    assert [p for p, _extravars in daemon.runner.runs].count("provision_playbook") == 2
    assert "carol" in daemon.broker.callbacks
    assert "provisioning" not in StatusFile.read(daemon.config["state_dir"])["repositories"]["carol.infn.it"]
