"""engine/scheduler.py on its own (no model): admission order by shared chunks, the skip
bound, max_num_seqs, the queue bound, aborts and draining; the size of a step's prefill piece."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from engine.scheduler import PROBE_ROWS, QueueFull, Scheduler, prefill_budget


@dataclass(eq=False)
class Item:
    """The smallest schedulable: an ID and the chunk keys its prompt uses."""
    request_id: str
    chunk_keys: frozenset[str] = frozenset()


def item(request_id: str, chunks: str = "") -> Item:
    return Item(request_id, frozenset(chunks))


def prefill_order(items: list[Item], max_skips: int = 8) -> list[str]:
    """Run the scheduler to the end, finishing each request right after its prefill."""
    s: Scheduler[Item] = Scheduler(max_num_seqs=1, max_queue=16, max_skips=max_skips)
    for it in items:
        s.add(it)
    order = []
    while s.has_work():
        out = s.schedule()
        assert out.prefill is not None and not out.decode
        order.append(out.prefill.request_id)
        s.finish(out.prefill)
    return order


def test_requests_sharing_chunks_with_the_last_prefill_go_first():
    items = [item("r0", "a"), item("r1", "b"), item("r2", "ab"), item("r3", "b"), item("r4", "a")]
    # r0 (a) first; then the most overlap with the previous pick, ties to the oldest.
    assert prefill_order(items) == ["r0", "r2", "r1", "r3", "r4"]


def test_skipping_is_bounded():
    items = [item("r0", "a"), item("r1", "b"), item("r2", "a"), item("r3", "a"), item("r4", "a")]
    assert prefill_order(items, max_skips=8) == ["r0", "r2", "r3", "r4", "r1"]
    assert prefill_order(items, max_skips=1) == ["r0", "r2", "r1", "r3", "r4"]


def test_prefill_until_the_batch_is_full_then_decode():
    s: Scheduler[Item] = Scheduler(max_num_seqs=2, max_queue=16)
    a, b, c = item("a"), item("b"), item("c")
    for it in (a, b, c):
        s.add(it)
    assert s.schedule().prefill is a
    s.prefilled(a)
    out = s.schedule()
    assert out.prefill is b and out.decode == [a]
    s.prefilled(b)
    out = s.schedule()
    assert out.prefill is None and out.decode == [a, b] and s.num_waiting == 1
    s.finish(a)
    assert s.schedule().prefill is c and s.num_running == 2


def test_streams_decode_while_one_prefill_is_in_progress():
    s: Scheduler[Item] = Scheduler(max_num_seqs=4, max_queue=16)
    a, b, c = item("a"), item("b"), item("c")
    s.add(a)
    assert s.schedule().prefill is a
    s.prefilled(a)
    s.add(b)
    s.add(c)
    out = s.schedule()
    assert out.prefill is b and out.decode == [a]  # a keeps decoding beside b's prefill
    out = s.schedule()
    assert out.prefill is b and out.decode == [a] and s.num_waiting == 1  # b's prefill goes on; one at a time
    s.abort("b")  # an aborted prefill lets the next one start
    out = s.schedule()
    assert out.aborted == [b] and out.prefill is c and out.decode == [a]


def test_queue_bound_and_closing():
    s: Scheduler[Item] = Scheduler(max_num_seqs=1, max_queue=2)
    s.add(item("a"))
    s.add(item("b"))
    with pytest.raises(QueueFull):
        s.add(item("c"))
    s.schedule()  # "a" leaves the queue: room for one more
    s.add(item("c"))
    s.accepting = False
    s.schedule()
    with pytest.raises(QueueFull):
        s.add(item("d"))


def test_abort_drops_waiting_and_running_requests():
    s: Scheduler[Item] = Scheduler(max_num_seqs=4, max_queue=16)
    a, b = item("a"), item("b")
    s.add(a)
    assert s.schedule().prefill is a
    s.add(b)
    s.abort("a")
    s.abort("b")
    s.abort("unknown")
    out = s.schedule()
    assert set(out.aborted) == {a, b} and out.idle
    assert not s.has_work()


def test_drain_returns_everything_in_flight():
    s: Scheduler[Item] = Scheduler(max_num_seqs=4, max_queue=16)
    a, b = item("a"), item("b")
    s.add(a)
    s.schedule()
    s.add(b)
    assert s.drain() == [b, a]
    assert not s.has_work() and s.schedule().idle


def test_a_prefill_piece_keeps_the_step_within_the_slowdown_of_its_decode():
    # 4 streams decoded in 0.05 s, a computed token costs 0.1 ms: at slowdown 3 the piece gets
    # the other 2 decode steps' time, 0.1 s = 1,000 rows
    assert prefill_budget(8192, 4, 0.05, 1e-4, 3.0) == 1000
    assert prefill_budget(8192, 4, 0.20, 1e-4, 3.0) == 4000          # a slower decode allows more
    assert prefill_budget(512, 4, 0.05, 1e-4, 3.0) == 508            # the token budget still caps it
    assert prefill_budget(8192, 4, 0.05, None, 3.0) == PROBE_ROWS    # cost unknown: a small piece measures it
    assert prefill_budget(8192, 4, 0.0001, 1e-4, 3.0) == 2           # never nothing
    assert prefill_budget(8192, 4, 0.05, 1e-4, 0.0) == 8188          # 0: the token budget alone
    assert prefill_budget(2, 4, 0.05, 1e-4, 0.0) == 1
