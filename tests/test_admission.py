"""The batch loop's admission policy (service/admission.py), as a pure function."""
from service.admission import Waiting, choose_admissions


def w(key, waited=0.0):
    return Waiting(key, waited)


def test_fifo_up_to_free_rows_when_every_row_can_share():
    waiting = [w(None) for _ in range(5)]
    assert choose_admissions(waiting, None, running=0, capacity=3, drain_after_s=2) == [0, 1, 2]
    assert choose_admissions(waiting, None, running=2, capacity=3, drain_after_s=2) == [0]
    assert choose_admissions(waiting, None, running=3, capacity=3, drain_after_s=2) == []
    assert choose_admissions([], None, running=0, capacity=3, drain_after_s=2) == []


def test_mixed_keys_share_when_the_engine_says_they_can():
    """VoxCPM's per-row time grids: steps 4, 10 and 30 all get key None and join together in order."""
    keys = [None, None, None]
    assert choose_admissions([w(k) for k in keys], None, running=1, capacity=8, drain_after_s=2) == [0, 1, 2]


def test_an_empty_batch_takes_the_oldest_requests_key():
    waiting = [w(10), w(4), w(10), w(4)]
    assert choose_admissions(waiting, None, running=0, capacity=8, drain_after_s=2) == [0, 2]


def test_other_keys_wait_behind_a_running_batch_but_never_starve():
    waiting = [w(4, waited=0.5), w(10, waited=0.1)]
    # The 4-step request has waited less than the bound: compatible work still joins.
    assert choose_admissions(waiting, 10, running=3, capacity=8, drain_after_s=2) == [1]
    # Past the bound nothing joins: the batch drains, and once empty the 4-step request goes first.
    waiting = [w(4, waited=2.5), w(10, waited=0.1)]
    assert choose_admissions(waiting, 10, running=3, capacity=8, drain_after_s=2) == []
    assert choose_admissions(waiting, None, running=0, capacity=8, drain_after_s=2) == [0]


def test_a_steady_stream_of_compatible_requests_cannot_hold_another_key_forever():
    """Simulated: every tick a new 10-step request arrives and rows finish; the 4-step one is
    admitted within the drain bound plus the time the batch takes to empty."""
    tick, running, running_key, waiting = 0.25, 4, 10, [w(4)]
    for t in range(100):
        waiting = [Waiting(x.key, x.waited_s + tick) for x in waiting] + [w(10)]
        chosen = choose_admissions(waiting, running_key if running else None, running, 8, drain_after_s=2)
        keys = {waiting[i].key for i in chosen}
        if 4 in keys:
            assert t * tick <= 2 + 4 * tick
            return
        running = max(0, running - 1) + len(chosen)  # one row finishes per tick
        running_key = next(iter(keys), running_key)
        waiting = [x for i, x in enumerate(waiting) if i not in chosen]
    raise AssertionError("the 4-step request was starved")
