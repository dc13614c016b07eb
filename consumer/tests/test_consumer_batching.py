import random

from cvmfs_publisher_consumer.batching import (CHANGES, FULL, PROVISION, Pending, RetryPolicy, Scheduler,
                                               reconnect_delays)


def sync(ref, *keys, attempts=0, not_before=0.0):
    return Pending(ref=ref, kind=CHANGES, keys=keys, attempts=attempts, not_before=not_before)


def test_events_of_a_running_repository_wait_and_coalesce():
    scheduler = Scheduler(max_parallel=4)
    scheduler.add("alice.infn.it", sync(1, "cvmfs/a"))
    [first] = scheduler.take_ready(now=0)
    assert (first.mode, first.keys, [m.ref for m in first.messages]) == (CHANGES, ["cvmfs/a"], [1])
    for ref, key in [(2, "cvmfs/b"), (3, "cvmfs/a"), (4, "cvmfs/c"), (5, "cvmfs/b")]:
        scheduler.add("alice.infn.it", sync(ref, key))
    assert scheduler.take_ready(now=1) == []          # one run per repository at a time
    scheduler.finished(first, succeeded=True, now=2)
    [second] = scheduler.take_ready(now=2)
    assert second.keys == ["cvmfs/a", "cvmfs/b", "cvmfs/c"]
    assert [m.ref for m in second.messages] == [2, 3, 4, 5]
    assert second.size == 3


def test_at_most_n_repositories_at_once_oldest_first():
    scheduler = Scheduler(max_parallel=2)
    scheduler.add("c.x.org", sync("c", "k", not_before=0))
    scheduler.add("a.x.org", sync("a", "k", not_before=0))
    scheduler.add("b.x.org", sync("b", "k", not_before=0))
    started = scheduler.take_ready(now=0)
    assert len(started) == 2 and len(scheduler.running) == 2
    assert scheduler.take_ready(now=0) == []
    scheduler.finished(started[0], succeeded=False, now=1)
    [third] = scheduler.take_ready(now=1)
    assert {b.lane for b in started + [third]} == {"a.x.org", "b.x.org", "c.x.org"}


def test_a_lane_waits_for_its_retry_time():
    scheduler = Scheduler(max_parallel=1)
    scheduler.add("a.x.org", sync(1, "k", attempts=1, not_before=100))
    scheduler.add("a.x.org", sync(2, "j"))
    assert scheduler.take_ready(now=99) == []
    [batch] = scheduler.take_ready(now=100)
    assert [m.ref for m in batch.messages] == [1, 2]


def test_provisioning_goes_first_and_identical_requests_share_a_run():
    scheduler = Scheduler(max_parallel=1)
    scheduler.add("a.x.org", sync(1, "k"))
    scheduler.add("a.x.org", Pending(ref=2, kind=PROVISION, request="req-a"))
    scheduler.add("a.x.org", Pending(ref=3, kind=PROVISION, request="req-a"))
    scheduler.add("a.x.org", Pending(ref=4, kind=PROVISION, request="req-b"))
    [batch] = scheduler.take_ready(now=0)
    assert (batch.mode, batch.request, [m.ref for m in batch.messages]) == (PROVISION, "req-a", [2, 3])
    scheduler.finished(batch, True, 0)
    assert scheduler.take_ready(now=0)[0].request == "req-b"


class NoJitter(random.Random):
    def random(self):
        return 0.0


def test_full_reconcile_when_due_takes_waiting_events_along():
    scheduler = Scheduler(max_parallel=1, full_interval=60, rng=NoJitter())
    scheduler.track("a.x.org", now=0)
    assert scheduler.take_ready(now=59) == []
    scheduler.add("a.x.org", sync(1, "k"))
    [changes] = scheduler.take_ready(now=59)
    assert changes.mode == CHANGES
    scheduler.finished(changes, True, 59)
    scheduler.add("a.x.org", sync(2, "j"))
    [full] = scheduler.take_ready(now=60)
    assert (full.mode, [m.ref for m in full.messages]) == (FULL, [2])
    scheduler.finished(full, True, 61)
    assert scheduler.take_ready(now=120) == []
    assert scheduler.take_ready(now=121)[0].mode == FULL


def test_no_full_reconcile_by_default():
    scheduler = Scheduler(max_parallel=1)
    scheduler.track("a.x.org", now=0)
    assert scheduler.take_ready(now=10 ** 9) == []


def test_drain():
    scheduler = Scheduler(max_parallel=1)
    scheduler.add("a.x.org", sync(1, "k"))
    scheduler.add("b.x.org", sync(2, "k"))
    assert sorted(m.ref for m in scheduler.drain()) == [1, 2]
    assert scheduler.waiting("a.x.org") == 0 and scheduler.waiting("b.x.org") == 0
    assert scheduler.take_ready(now=0) == []


def test_retry_policy_backs_off_then_dead_letters():
    policy = RetryPolicy(max_attempts=3, initial_delay=10, max_delay=15, rng=random.Random(1))
    first = policy.after_failure(sync(1, "k"), now=1000)
    assert first.action == "retry" and first.attempts == 1 and 1005 <= first.not_before <= 1010
    second = policy.after_failure(sync(1, "k", attempts=1), now=1000)
    assert second.action == "retry" and second.attempts == 2 and 1007.5 <= second.not_before <= 1015  # capped
    third = policy.after_failure(sync(1, "k", attempts=2), now=1000)
    assert (third.action, third.attempts) == ("dead-letter", 3)


def test_reconnect_delays_grow_to_the_cap_with_jitter():
    delays = reconnect_delays(1, 8, rng=random.Random(2))
    values = [next(delays) for _ in range(8)]
    caps = [1, 2, 4, 8, 8, 8, 8, 8]
    assert all(cap / 2 <= value <= cap for value, cap in zip(values, caps))
    assert len(set(values)) == len(values)  # jittered


def test_a_batch_with_many_keys_runs_as_one_full_sync():
    scheduler = Scheduler(max_parallel=1, full_threshold=3)
    scheduler.add("a.x.org", sync(1, "k1", "k2"))
    scheduler.add("a.x.org", sync(2, "k2"))
    [small] = scheduler.take_ready(now=0)
    assert small.mode == CHANGES
    scheduler.finished(small, True, 0)
    scheduler.add("a.x.org", sync(3, "k1", "k2"))
    scheduler.add("a.x.org", sync(4, "k3"))
    [big] = scheduler.take_ready(now=0)
    assert (big.mode, big.keys, [m.ref for m in big.messages], big.size) == (FULL, ["k1", "k2", "k3"], [3, 4], 3)


def test_the_first_full_reconcile_of_each_lane_falls_at_a_random_point_of_the_first_interval():
    scheduler = Scheduler(max_parallel=100, full_interval=3600, rng=random.Random(7))
    lanes = ["r%02d.x.org" % i for i in range(50)]
    for lane in lanes:
        scheduler.track(lane, now=0)
    due_at = {}
    for minute in range(61):
        for batch in scheduler.take_ready(now=minute * 60):
            assert batch.mode == FULL
            due_at[batch.lane] = minute
            scheduler.finished(batch, True, minute * 60)
    assert set(due_at) == set(lanes)  # every lane within the first interval ...
    assert len(set(due_at.values())) > 20  # ... spread over it, not all at once


def test_after_a_failed_run_the_lane_backs_off_whatever_arrives_and_others_go_on():
    scheduler = Scheduler(max_parallel=4, backoff=lambda failures: 10.0 * 2 ** (failures - 1))
    scheduler.add("a.x.org", sync(1, "k"))
    [failed] = scheduler.take_ready(now=0)
    scheduler.finished(failed, succeeded=False, now=1)
    scheduler.add("a.x.org", sync(2, "new"))           # a fresh event, no retry header of its own
    scheduler.add("b.x.org", sync(3, "k"))
    [other] = scheduler.take_ready(now=1)
    assert other.lane == "b.x.org"                     # another repository is not delayed
    assert scheduler.take_ready(now=10.9) == []
    [again] = scheduler.take_ready(now=11)
    assert [m.ref for m in again.messages] == [2]
    scheduler.finished(again, succeeded=False, now=12)
    scheduler.add("a.x.org", sync(4, "k"))
    assert scheduler.take_ready(now=31.9) == []        # 20 s: doubles with each consecutive failure
    [third] = scheduler.take_ready(now=32)
    scheduler.finished(third, succeeded=True, now=33)
    scheduler.add("a.x.org", sync(5, "k"))
    assert scheduler.take_ready(now=33)                # reset on success


def test_dead_lettered_messages_bring_a_full_sync_once_the_lane_may_run_until_one_succeeds():
    scheduler = Scheduler(max_parallel=1, backoff=lambda failures: 5.0)
    scheduler.add("a.x.org", sync(1, "k"))
    [failed] = scheduler.take_ready(now=0)
    scheduler.finished(failed, succeeded=False, now=0)
    scheduler.reconcile_soon("a.x.org")                # its message went to the dead-letter queue
    assert scheduler.take_ready(now=4) == []           # the cause may still be there: wait the backoff
    [full] = scheduler.take_ready(now=5)
    assert (full.mode, full.messages) == (FULL, [])
    scheduler.finished(full, succeeded=False, now=5)
    [full_again] = scheduler.take_ready(now=10)
    assert full_again.mode == FULL
    scheduler.finished(full_again, succeeded=True, now=10)
    assert scheduler.take_ready(now=10 ** 6) == []     # done: no periodic reconcile configured


def test_unasked_full_syncs_run_only_where_this_host_is_the_active_writer():
    """Periodic and dead-letter full syncs run only on the repository's active host; a standby keeps them owed
    (and runs them if it becomes active). Events it receives still run: only the active consumer gets any."""
    active = set()
    scheduler = Scheduler(max_parallel=4, full_interval=60, rng=NoJitter(), active=lambda lane: lane in active)
    scheduler.track("a.x.org", now=0)
    scheduler.reconcile_soon("b.x.org")
    assert scheduler.take_ready(now=600) == []
    assert scheduler.owes_full("b.x.org") and not scheduler.owes_full("a.x.org")
    scheduler.add("a.x.org", sync(1, "k"))
    [full] = scheduler.take_ready(now=600)             # a full was due: it covers the event it got
    assert (full.lane, full.mode) == ("a.x.org", FULL)
    scheduler.finished(full, True, 600)
    active.add("b.x.org")
    [owed] = scheduler.take_ready(now=601)
    assert (owed.lane, owed.mode, owed.messages) == ("b.x.org", FULL, [])
    scheduler.finished(owed, True, 601)
    assert not scheduler.owes_full("b.x.org")
