"""Block manager: reference counts, prefix-cache index, LRU eviction."""

from engine.kv_cache import ROOT_HASH, BlockManager, block_hash


def hashes(tokens: list[int], block_size: int) -> list[bytes]:
    out, parent = [], ROOT_HASH
    for i in range(len(tokens) // block_size):
        parent = block_hash(parent, tokens[i * block_size : (i + 1) * block_size])
        out.append(parent)
    return out


def test_allocate_and_release_return_blocks_to_the_pool():
    bm = BlockManager(num_blocks=4, block_size=2)
    got = bm.allocate(3)
    assert got is not None and len(set(got)) == 3
    assert bm.num_free == 1
    assert bm.allocate(2) is None and bm.num_free == 1  # nothing taken on failure
    bm.release(got)
    assert bm.num_free == 4


def test_shared_prefix_blocks_are_reference_counted():
    bm = BlockManager(num_blocks=8, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    first = bm.allocate(3)
    for b, h in zip(first, hashes(tokens, 2), strict=False):
        bm.register(b, h)
    hit = bm.match_prefix(hashes(tokens, 2))
    assert hit == first[:2]
    bm.acquire(hit)
    assert [bm.ref_count(b) for b in hit] == [2, 2]
    bm.release(first)
    assert [bm.ref_count(b) for b in hit] == [1, 1]
    assert bm.hits == 2


def test_chain_hash_depends_on_the_whole_prefix():
    assert hashes([1, 2, 3, 4], 2)[1] != hashes([9, 9, 3, 4], 2)[1]


def test_unreferenced_cached_blocks_are_evicted_lru_only_when_needed():
    bm = BlockManager(num_blocks=3, block_size=1)
    a, b = bm.allocate(1)[0], bm.allocate(1)[0]
    bm.register(a, b"ha")
    bm.register(b, b"hb")
    bm.release([a])
    bm.release([b])
    assert bm.num_free == 3
    bm.allocate(1)  # takes the never-used block first
    assert bm.match_prefix([b"ha"]) == [a]
    bm.allocate(1)  # now evicts a, released earliest
    assert bm.match_prefix([b"ha"]) == []
    assert bm.match_prefix([b"hb"]) == [b]


def test_prefix_caching_off_never_matches():
    bm = BlockManager(num_blocks=2, block_size=1, prefix_caching=False)
    block = bm.allocate(1)[0]
    bm.register(block, b"h")
    assert bm.match_prefix([b"h"]) == []
