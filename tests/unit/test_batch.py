"""The provisioning modules' `batch` option (module_utils/_module.py PublisherModule.run_batch) and the role's
filters that build the batches (plugins/filter/batch.py)."""
import json

import pytest
from ansible.errors import AnsibleFilterError
from ansible.module_utils.testing import patch_module_args

from ansible_collections.infn_cloud.cvmfs_publisher.plugins.filter import batch as filters
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.module_utils._module import PublisherError
from ansible_collections.infn_cloud.cvmfs_publisher.plugins.modules import amqp_queue, rgw_topic

API = "http://127.0.0.1:9"


def run_main(module, args, capsys):
    with patch_module_args(args):
        with pytest.raises(SystemExit):
            module.main()
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def queues(monkeypatch):
    """amqp_queue with its client counted and ensure_queue_present recording each call's options."""
    seen = {"clients": 0, "calls": []}

    class Api:
        def __init__(self, params):
            seen["clients"] += 1

    def ensure(api, params, check_mode):
        seen["calls"].append(dict(params, check_mode=check_mode))
        if params["name"] == "broken":
            raise PublisherError("queue broken is not a quorum queue", queue="broken")
        changed = params["name"] != "same"
        return dict(changed=changed, name=params["name"],
                    diff=dict(before={}, after=dict(name=params["name"])))

    monkeypatch.setattr(amqp_queue, "ManagementApi", Api)
    monkeypatch.setattr(amqp_queue, "ensure_queue_present", ensure)
    return seen


def test_each_item_is_merged_over_the_task_options_and_checked_on_its_own(queues, capsys):
    result = run_main(amqp_queue, dict(api_url=API, exchange="events", single_active_consumer=False, batch=[
        dict(name="alice", routing_key="alice"),
        dict(name="same", exchange="other"),
        dict(routing_key="nameless"),
        dict(name="bob", dead_letter_queue="dead"),
        dict(name="carol", colour="blue"),
        dict(name="broken"),
    ]), capsys)
    assert [call["name"] for call in queues["calls"]] == ["alice", "same", "broken"]
    assert queues["calls"][0]["exchange"] == "events" and queues["calls"][0]["single_active_consumer"] is False
    assert queues["calls"][1]["exchange"] == "other" and queues["calls"][1]["routing_key"] is None
    assert queues["clients"] == 1, "the items share one client"
    assert result["failed"] and result["changed"]
    assert result["msg"] == (
        "4 of 6 failed: item 3: missing required arguments: name; "
        "bob: missing parameter(s) required by 'dead_letter_queue': dead_letter_exchange; "
        "carol: unsupported option colour. Supported parameters include: " + result["results"][4]["msg"].split(
            "Supported parameters include: ")[1] + "; "
        "broken: queue broken is not a quorum queue")
    assert [(r["item"], r["changed"], r.get("failed", False)) for r in result["results"]] == [
        (dict(name="alice", routing_key="alice"), True, False), (dict(name="same", exchange="other"), False, False),
        (dict(routing_key="nameless"), False, True), (dict(name="bob", dead_letter_queue="dead"), False, True),
        (dict(name="carol", colour="blue"), False, True), (dict(name="broken"), False, True)]
    assert result["results"][5]["queue"] == "broken", "a PublisherError's details stay with its item"
    assert "diff" not in result and all("diff" not in r for r in result["results"]), "no diff unless asked"


def test_check_mode_and_diff_apply_to_every_item(queues, capsys):
    result = run_main(amqp_queue, dict(api_url=API, _ansible_check_mode=True, _ansible_diff=True,
                                       batch=[dict(name="alice"), dict(name="bob")]), capsys)
    assert not result.get("failed") and result["changed"]
    assert [call["check_mode"] for call in queues["calls"]] == [True, True]
    assert result["diff"] == [dict(before={}, after=dict(name="alice"), before_header="alice", after_header="alice"),
                              dict(before={}, after=dict(name="bob"), before_header="bob", after_header="bob")]


def test_a_batch_of_one_fails_with_that_items_message_alone(queues, capsys):
    result = run_main(amqp_queue, dict(api_url=API, batch=[dict(name="broken")]), capsys)
    assert result["failed"] and result["msg"] == "broken: queue broken is not a quorum queue"


def test_an_empty_batch_changes_nothing(queues, capsys):
    result = run_main(amqp_queue, dict(api_url=API, batch=[]), capsys)
    assert result["changed"] is False and result["results"] == [] and queues["calls"] == []


def test_without_a_batch_required_options_are_still_required(queues, capsys):
    result = run_main(amqp_queue, dict(api_url=API), capsys)
    assert result["failed"] and result["msg"] == "missing required arguments: name"


def test_an_items_broker_password_never_reaches_the_result(monkeypatch, capsys):
    monkeypatch.setattr(rgw_topic, "Connection", lambda params: object())
    monkeypatch.setattr(rgw_topic, "ensure_topic", lambda conn, params, check: dict(
        changed=False, name=params["name"], arn="arn:aws:sns:default::" + params["name"],
        push_endpoint=params["push_endpoint"]))
    result = run_main(rgw_topic, dict(endpoint_url="http://127.0.0.1:9", batch=[
        dict(name="alice", push_endpoint="amqps://user:Sup3r-s3cret@broker:5671"),
        dict(name="bob", push_endpoint="amqps://broker:5671")]), capsys)
    assert not result.get("failed"), result
    assert "Sup3r-s3cret" not in json.dumps(result)
    assert result["results"][1]["push_endpoint"] == "amqps://broker:5671"


def test_an_item_without_the_options_a_state_requires_fails_alone(monkeypatch, capsys):
    monkeypatch.setattr(rgw_topic, "Connection", lambda params: object())
    monkeypatch.setattr(rgw_topic, "ensure_topic", lambda conn, params, check: dict(changed=True, name=params["name"]))
    result = run_main(rgw_topic, dict(endpoint_url="http://127.0.0.1:9", batch=[
        dict(name="alice", push_endpoint="amqp://broker:5672"), dict(name="bob")]), capsys)
    assert result["msg"] == "1 of 2 failed: bob: state is present but all of the following are missing: push_endpoint"
    assert result["results"][0]["changed"] and result["changed"]


# -- the role's filters --------------------------------------------------------------------------------------------

def test_repository_requests_adds_short_names_and_keeps_a_bad_name_for_its_module_to_refuse():
    assert filters.repository_requests([{"repository": "alice.infn.it", "subject": "s1", "owner": "x"},
                                        {"repository": "atlas.infn.it", "group": "atlas", "subject": None},
                                        {"repository": "bad name.infn.it", "group": "g"}]) == [
        {"repository": "alice.infn.it", "subject": "s1", "group": "", "short": "alice"},
        {"repository": "atlas.infn.it", "subject": "", "group": "atlas", "short": "atlas"},
        {"repository": "bad name.infn.it", "subject": "", "group": "g", "short": ""}]


@pytest.mark.parametrize("requests, message", [
    ("alice.infn.it", "expects a list"),
    ([{"subject": "x"}], "repository request 1 has no repository name: {'subject': 'x'}"),
    ([{"repository": "a.b"}, "c.d"], "repository request 2 has no repository name: 'c.d'"),
])
def test_repository_requests_names_an_entry_without_a_name(requests, message):
    with pytest.raises(AnsibleFilterError, match=message.replace("(", r"\(").replace("{", r"\{")):
        filters.repository_requests(requests)


def test_batch_items_fills_in_each_request_and_leaves_out_empty_options():
    requests = filters.repository_requests([{"repository": "alice.infn.it", "subject": "s1"},
                                            {"repository": "atlas.infn.it", "group": "atlas"}])
    assert filters.batch_items(requests, repository="{repository}", subject="{subject}", group="{group}",
                               txn_dir="/srv/{repository}/txn", force=False) == [
        {"repository": "alice.infn.it", "subject": "s1", "txn_dir": "/srv/alice.infn.it/txn", "force": False},
        {"repository": "atlas.infn.it", "group": "atlas", "txn_dir": "/srv/atlas.infn.it/txn", "force": False}]
    with pytest.raises(AnsibleFilterError, match="cannot fill in name='{colour}'"):
        filters.batch_items(requests, name="{colour}")


def test_succeeded_keeps_the_requests_whose_element_did_not_fail():
    requests = [{"repository": "a"}, {"repository": "b"}, {"repository": "c"}]
    step = {"failed": True, "results": [{"changed": True}, {"failed": True, "msg": "no"}, {"changed": False}]}
    assert filters.succeeded(requests, step) == [{"repository": "a"}, {"repository": "c"}]
    assert filters.succeeded(requests, {"skipped": True}) == requests
    assert filters.succeeded(requests, {"failed": True, "msg": "module died"}) == []


# -- review findings: aliases, exclusive options across the two levels, secrets before any item ran ---------------

def test_an_items_option_wins_over_the_tasks_alias_of_it(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(rgw_topic, "Connection", lambda params: seen.append(params["endpoint_url"]) or object())
    monkeypatch.setattr(rgw_topic, "ensure_topic", lambda conn, params, check: dict(changed=False))
    result = run_main(rgw_topic, dict(rgw_endpoint="http://task:1", push_endpoint="amqp://b:5672", batch=[
        dict(name="alice", endpoint_url="http://item:1"), dict(name="bob")]), capsys)
    assert not result.get("failed"), result
    assert seen == ["http://item:1", "http://task:1"]
    assert not result.get("warnings"), result["warnings"]


def test_an_items_option_replaces_the_task_options_it_excludes(queues, capsys, tmp_path):
    password_file = tmp_path / "password"
    password_file.write_text("from-a-file\n")
    result = run_main(amqp_queue, dict(api_url=API, login_password="task-level", batch=[
        dict(name="alice", login_password_file=str(password_file)), dict(name="bob")]), capsys)
    assert not result.get("failed"), result
    assert [(c["login_password"], c["login_password_file"]) for c in queues["calls"]] == [
        (None, str(password_file)), ("task-level", None)]


def test_connection_options_may_come_with_each_item(queues, capsys):
    result = run_main(amqp_queue, dict(batch=[dict(name="alice", api_url=API), dict(name="bob")]), capsys)
    assert [call["name"] for call in queues["calls"]] == ["alice"]
    assert result["msg"] == "1 of 2 failed: bob: missing required arguments: api_url"


@pytest.mark.parametrize("task, items", [
    # an item that fails its checks, with a password option and a password in a URL
    (dict(endpoint_url="http://127.0.0.1:9"),
     [dict(name="alice", push_endpoint="amqps://u:Sup3r-s3cret@b:5671", colour="blue"),
      dict(name="bob", push_endpoint="amqps://b:5671", secret_key="Sup3r-s3cret")]),
    # the task's own options fail their checks: nothing runs, the items are echoed in the invocation
    (dict(endpoint_url="http://127.0.0.1:9", persistent="maybe"),
     [dict(name="alice", push_endpoint="amqps://u:Sup3r-s3cret@b:5671", secret_key="Sup3r-s3cret")]),
    # the password in the task's URL, no item reaches the module's code
    (dict(endpoint_url="http://127.0.0.1:9", push_endpoint="amqps://u:Sup3r-s3cret@b:5671"), [dict(colour="x")]),
])
def test_secrets_of_every_item_are_masked_in_the_log_line_and_the_result(monkeypatch, capsys, task, items):
    logged = []
    monkeypatch.setattr(rgw_topic.PublisherModule, "log", lambda self, msg, log_args=None: logged.append(msg))
    monkeypatch.setattr(rgw_topic, "Connection", lambda params: object())
    monkeypatch.setattr(rgw_topic, "ensure_topic", lambda conn, params, check: dict(changed=False))
    result = run_main(rgw_topic, dict(task, batch=items), capsys)
    assert result["failed"]
    assert logged or "persistent" in result["msg"], "the module logs its invocation once its own options pass"
    assert all("Sup3r-s3cret" not in line for line in logged), logged
    assert "Sup3r-s3cret" not in json.dumps(result), result
