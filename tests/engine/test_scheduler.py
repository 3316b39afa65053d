"""Continuous batching decisions, without a model."""

from engine.kv_cache import BlockManager
from engine.scheduler import Scheduler, Sequence, Status


def seq(n_prompt: int, max_new: int = 4, rid: str | None = None, first: int = 100) -> Sequence:
    tokens = list(range(first, first + n_prompt))
    return Sequence(rid or f"r{n_prompt}", tokens, n_prompt, n_prompt + max_new)


def run_step(s: Scheduler) -> list[tuple[str, int]]:
    """Schedule, then pretend the model computed the tokens and sampled one per finished prompt."""
    batch = s.schedule()
    for q, n in batch.items:
        s.advance(q, n)
        if q.num_computed == q.num_tokens:
            q.token_ids.append(7)
    return [(q.request_id, n) for q, n in batch.items]


def test_chunked_prefill_respects_the_token_budget():
    s = Scheduler(BlockManager(64, 4), max_num_batched_tokens=8)
    s.add(seq(20, rid="long"))
    s.add(seq(3, rid="short", first=500))
    assert run_step(s) == [("long", 8)]
    assert run_step(s) == [("long", 8)]
    assert run_step(s) == [("long", 4), ("short", 3)]
    assert run_step(s) == [("long", 1), ("short", 1)]  # both decode now


def test_requests_join_and_leave_every_step():
    s = Scheduler(BlockManager(64, 4), max_num_batched_tokens=64)
    a = seq(5, rid="a")
    s.add(a)
    run_step(s)
    s.add(seq(6, rid="b", first=200))
    assert run_step(s) == [("a", 1), ("b", 6)]
    s.finish(a)
    assert a.status is Status.FINISHED
    assert run_step(s) == [("b", 1)]


def test_preemption_frees_the_newest_and_recomputes_it_later():
    s = Scheduler(BlockManager(4, 2), max_num_batched_tokens=64)
    old, new = seq(3, rid="old"), seq(3, rid="new", first=200)
    s.add(old)
    s.add(new)
    run_step(s)  # each holds 2 blocks: the pool is full
    assert s.blocks.num_free == 0
    run_step(s)  # position 3 still fits the second block
    assert run_step(s) == [("old", 1)]  # old needs a third block at position 4: new is preempted
    assert new.status is Status.WAITING and new.num_computed == 0 and new.num_preemptions == 1
    assert s.waiting[0] is new
    s.finish(old)
    # Recomputed: its first block survived in the prefix cache, the tail block was evicted for old.
    assert run_step(s) == [("new", 3)]
    assert new.num_computed == 5


def test_max_num_seqs_caps_the_running_batch():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=2)
    for i in range(3):
        s.add(seq(4, rid=f"r{i}", first=100 * i))
    assert [rid for rid, _ in run_step(s)] == ["r0", "r1"]


def test_admission_reuses_cached_prefix_blocks():
    bm = BlockManager(16, 4)
    s = Scheduler(bm)
    first = seq(10, rid="first")
    s.add(first)
    run_step(s)
    second = Sequence("second", list(first.token_ids[:10]), 10, 14)
    s.add(second)
    assert run_step(s) == [("first", 1), ("second", 2)]
    assert second.num_cached_tokens == 8
    assert second.block_table[:2] == first.block_table[:2]
    assert bm.ref_count(first.block_table[0]) == 2
