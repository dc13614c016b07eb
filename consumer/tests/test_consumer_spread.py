"""The spreading policy (spread.py): fair shares and which positions a host gives up, from a consumer list."""
from cvmfs_publisher_consumer import amqp
from cvmfs_publisher_consumer.spread import View, fair_shares, summary, to_give_up

QUEUES = ["r%02d" % i for i in range(10)]


def consumers(active, waiting=()):
    """A /api/consumers list: ``active`` {queue: host}, every host in ``waiting`` waits on every queue."""
    listing = []
    for serial, (queue, host) in enumerate(sorted(active.items())):
        listing.append({"queue": {"name": queue, "vhost": "/"}, "consumer_tag": amqp.consumer_tag(host, serial),
                        "active": True, "activity_status": "single_active"})
        for other in waiting:
            if other != host:
                listing.append({"queue": {"name": queue, "vhost": "/"}, "active": False,
                                "consumer_tag": amqp.consumer_tag(other, serial), "activity_status": "waiting"})
    return listing


def test_consumer_tags_name_the_host_and_other_clients_are_ignored():
    assert amqp.host_of_tag(amqp.consumer_tag("pub-1.example.org", 7)) == "pub-1.example.org"
    assert amqp.host_of_tag("amq.ctag-abc") is None and amqp.host_of_tag(None) is None
    view = View.from_consumers(consumers({"r00": "a"}, waiting=["b"]) + [
        {"queue": {"name": "r01"}, "consumer_tag": "amq.ctag-x", "active": True}])
    assert view.active == {"r00": "a"} and view.standby == {"r00": {"b"}}
    assert view.counts(QUEUES) == {"a": 1, "b": 0}


def test_fair_shares_are_within_one_and_the_biggest_holders_keep_the_extra():
    assert fair_shares({"a": 10, "b": 0, "c": 0}, 10) == {"a": 4, "b": 3, "c": 3}
    assert fair_shares({"a": 4, "b": 4, "c": 2}, 10) == {"a": 4, "b": 3, "c": 3}
    assert fair_shares({"a": 3, "b": 3, "c": 4}, 10) == {"a": 3, "b": 3, "c": 4}
    assert fair_shares({"a": 3, "b": 3, "c": 2, "d": 2}, 10) == {"a": 3, "b": 3, "c": 2, "d": 2}
    assert fair_shares({}, 10) == {}


def test_a_host_holding_everything_gives_up_its_surplus_and_only_idle_positions():
    view = View.from_consumers(consumers({q: "a" for q in QUEUES}, waiting=["a", "b", "c"]))
    assert to_give_up(view, "a", QUEUES, idle=lambda q: True) == QUEUES[:6]
    busy = {"r00", "r01"}
    assert to_give_up(view, "a", QUEUES, idle=lambda q: q not in busy) == QUEUES[2:8]
    assert to_give_up(view, "b", QUEUES, idle=lambda q: True) == []


def test_a_balanced_spread_moves_nothing_and_a_new_host_gets_its_share():
    balanced = {q: host for q, host in zip(QUEUES, "aaaabbbccc")}
    view = View.from_consumers(consumers(balanced, waiting=["a", "b", "c"]))
    assert [to_give_up(view, h, QUEUES, idle=lambda q: True) for h in "abc"] == [[], [], []]
    joined = View.from_consumers(consumers(balanced, waiting=["a", "b", "c", "d"]))
    gives = {h: to_give_up(joined, h, QUEUES, idle=lambda q: True) for h in "abcd"}
    assert gives == {"a": ["r00"], "b": [], "c": ["r07"], "d": []}   # 3/3/2/2 once d takes them
    assert summary(joined, "b", QUEUES)["hosts"] == {"a": 4, "b": 3, "c": 3, "d": 0}


def test_no_position_is_given_up_where_nobody_waits_to_take_it():
    view = View.from_consumers(consumers({q: "a" for q in QUEUES[:4]}) + consumers(
        {q: "b" for q in QUEUES[4:]}, waiting=["a", "b"]))
    # a holds r00-r03 with nobody waiting there; b (6 of 10) has a surplus of 1 and a waits on its queues
    assert to_give_up(view, "a", QUEUES, idle=lambda q: True) == []
    assert to_give_up(view, "b", QUEUES, idle=lambda q: True) == ["r04"]
    assert summary(view, "a", QUEUES) == {"active": QUEUES[:4], "standby": QUEUES[4:], "hosts": {"a": 4, "b": 6}}
