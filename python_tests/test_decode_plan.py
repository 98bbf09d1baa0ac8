"""The CUDA decode kernels' split plan, checked on the CPU through ``std::decode_split_plan``.

The op runs the planner the CUDA glue runs (``csrc/kernels/decode_plan.h``). What the GPU's
bit-exactness rests on (DESIGN.md §5): the tiles and their splits do not depend on Qn, on
kv_len (a longer list only appends tiles) or on the cache capacity (vanilla decoding allocates
γ+1 fewer positions than StD: up to γ_max + 1 = 13); every list entry lies in exactly one
tile; the tail's tiles sit at fixed entries. Also: one wave of blocks, balanced splits.
"""

import itertools
import random

import pytest
import torch
from conftest import assert_raises_naming

import std_ext

TILE = 64
GAMMA_MAX = 12
# (batch, kv_heads, sm_count, blocks_per_sm): Qwen2-7B on an H100/H200, batch 8, a small GPU,
# more heads than slots
GPUS = [(1, 4, 132, 2), (8, 4, 132, 2), (2, 2, 108, 3), (3, 7, 8, 1), (64, 8, 132, 2), (1, 1, 132, 2)]


def plan(batch=1, kv_heads=4, q_len=1, group=7, capacity=4096, num_indices=0, tail_len=1000, sms=132, per_sm=2,
         launched_per_sm=0, splits_per_block=0):
    tiles, info = std_ext.ops.decode_split_plan(batch, kv_heads, q_len, group, capacity, num_indices, tail_len,
                                                sms, per_sm, launched_per_sm, splits_per_block)
    return tiles, info.tolist()


def by_split(tiles):
    """The tiles split by split, each split's in its order (blocks may take several splits)."""
    return sorted(tuple(row) for row in tiles.tolist())


def tile_set(tiles):
    return {tuple(row) for row in tiles.tolist()}


@pytest.mark.parametrize("batch, kv_heads, sms, per_sm", GPUS)
@pytest.mark.parametrize("num_indices", [0, 1000, 1024, 2048])
def test_split_points_independent_of_qn_and_capacity(batch, kv_heads, sms, per_sm, num_indices):
    """Qn (1 decode, γ+1 verify, anything up to 20 x G 8) and capacity changes of up to γ_max + 1
    (vanilla vs StD) leave every tile, its split and its order unchanged."""
    rng = random.Random(batch * 1000 + kv_heads * 10 + num_indices)
    capacities = [64, 127, 128, 4096 - 5, 4096, 32768 + 3] + [rng.randint(1, 300_000) for _ in range(6)]
    for tail_len in (0, 1, 63, 64, 777, 5000):
        base_tiles, base_info = plan(batch, kv_heads, 1, 7, capacities[0], num_indices, tail_len, sms, per_sm)
        for capacity, delta, (q_len, group) in itertools.product(
                capacities, (0, 1, 7, GAMMA_MAX + 1), [(1, 1), (1, 7), (10, 7), (13, 8), (20, 8), (1, 16)]):
            tiles, info = plan(batch, kv_heads, q_len, group, capacity + delta, num_indices, tail_len, sms, per_sm,
                               launched_per_sm=1)
            assert by_split(tiles) == by_split(base_tiles), (capacity, delta, q_len, group, tail_len)
            assert info[:3] == base_info[:3]


@pytest.mark.parametrize("batch, kv_heads, sms, per_sm", GPUS)
@pytest.mark.parametrize("num_indices", [0, 150, 1024])
def test_every_entry_in_exactly_one_tile(batch, kv_heads, sms, per_sm, num_indices):
    for tail_len in (0, 1, 64, 65, 1000, 9999):
        tiles, (splits, tail_offset, tile, *_) = plan(batch, kv_heads, 1, 4, 0, num_indices, tail_len, sms, per_sm)
        list_len = tail_offset + tail_len
        spans = sorted((first, end) for _, _, first, end in tiles.tolist())
        assert tile == TILE and tail_offset == -(-num_indices // TILE) * TILE
        covered = 0
        for first, end in spans:
            assert first == covered and first % TILE == 0 and first < end <= first + TILE, (first, end)
            covered = end
        assert covered == list_len
        # splits take their tiles round-robin, in ascending order, numbered 0, 1, 2, ...
        for split, order, first, _ in tiles.tolist():
            assert first // TILE == split + order * splits
        per_split = torch.bincount(tiles[:, 0], minlength=splits) if len(tiles) else torch.zeros(splits)
        assert per_split.max() - per_split.min() <= 1  # balanced whatever the list's length


@pytest.mark.parametrize("batch, kv_heads, sms, per_sm", GPUS[:4])
@pytest.mark.parametrize("num_indices", [0, 1000])
def test_longer_lists_only_append_tiles(batch, kv_heads, sms, per_sm, num_indices):
    """kv_len grows by one per step: every tile of the shorter list keeps its split and order,
    and only the last one can grow (its end is the list's end)."""
    previous = None
    for tail_len in range(0, 700, 13):
        tiles, (_, tail_offset, *_rest) = plan(batch, kv_heads, 1, 7, 5000, num_indices, tail_len, sms, per_sm)
        rows = {(s, o, f): e for s, o, f, e in tiles.tolist()}
        if previous is not None:
            old_rows, old_len = previous
            for key, end in old_rows.items():
                assert key in rows, key
                assert rows[key] == end or end == old_len, (key, end)
        previous = rows, tail_offset + tail_len


@pytest.mark.parametrize("num_indices", [0, 1, 150, 1024, 2048])
def test_the_tail_has_its_own_tiles_at_fixed_entries(num_indices):
    """The tail starts on a tile boundary (no tile mixes keep entries and tail positions), tail
    position tail_start + m always sits in tile tail_offset/64 + m//64, and the draft's tail is
    spread over splits of its own: with the keep set at 16 tiles and 66 splits (Qwen2-7B, B = 1,
    132 SMs x 2), a tail of up to 50 tiles adds no tile to any split that already has one."""
    tail_tiles = {}
    for tail_len in (1, 64, 300, 1024, 3200):
        tiles, (splits, tail_offset, *_) = plan(1, 4, 1, 7, 40000, num_indices, tail_len, 132, 2)
        assert tail_offset % TILE == 0 and num_indices <= tail_offset < num_indices + TILE
        for split, order, first, end in tiles.tolist():
            if first >= tail_offset:
                m = (first - tail_offset) // TILE
                tail_tiles.setdefault(m, (split, order))
                assert tail_tiles[m] == (split, order), m
            else:
                assert first < num_indices  # a keep tile holds keep entries, never only padding
        if num_indices == 1024 and tail_len <= 3200:
            assert splits == 66
            assert torch.bincount(tiles[:, 0]).max() <= 1


@pytest.mark.parametrize("batch, kv_heads, sms, per_sm", GPUS)
def test_one_wave_of_blocks(batch, kv_heads, sms, per_sm):
    """num_splits = floor(slots / (B x H_kv)) (at least 1, at most 256): never a second wave."""
    _, (splits, *_rest) = plan(batch, kv_heads, 1, 7, 1000, 0, 1000, sms, per_sm)
    slots = sms * per_sm
    heads = batch * kv_heads
    assert splits == max(1, min(256, slots // heads))
    assert heads > slots or splits * heads <= slots


@pytest.mark.parametrize("q_len, group, layout, warps, row_groups",
                         [(1, 1, 2, 4, 1), (1, 7, 2, 4, 1), (1, 16, 2, 4, 1), (2, 8, 2, 4, 1), (1, 17, 1, 4, 1),
                          (10, 4, 1, 4, 1), (10, 7, 1, 8, 1), (16, 8, 1, 8, 1), (20, 8, 1, 8, 2)])
def test_layout_follows_the_rows(q_len, group, layout, warps, row_groups):
    _, info = plan(q_len=q_len, group=group)
    assert info[3:6] == [layout, warps, row_groups]


def test_bad_arguments_name_the_op():
    for args in [(0, 4, 1, 7, 10, 0, 10, 132, 2), (1, 4, 1, 7, 10, -1, 10, 132, 2), (1, 4, 1, 7, 10, 0, 10, 0, 2),
                 (1, 4, 1, 7, 10, 0, 10, 132, 2, -1), (1, 4, 1, 7, 10, 0, 10, 132, 2, 0, 257)]:
        assert_raises_naming(lambda: std_ext.ops.decode_split_plan(*args), "decode_split_plan")


def blocks_in_order(splits, split_blocks, tiles_of):
    """An independent enumeration of what each block of the kernel's grid computes: block x
    takes splits x, x + split_blocks, ... in turn, each one's tiles in order."""
    return [(split, order) for x in range(split_blocks) for split in range(x, splits, split_blocks)
            for order in range(tiles_of[split])]


@pytest.mark.parametrize("batch, kv_heads, sms, per_sm", GPUS)
@pytest.mark.parametrize("q_len, group", [(1, 7), (4, 7), (10, 7), (16, 8), (20, 8), (40, 8)])
@pytest.mark.parametrize("launched_per_sm", [0, 1, 2, 3])
def test_blocks_take_their_splits_in_turn_and_fit_one_wave(batch, kv_heads, sms, per_sm, q_len, group,
                                                           launched_per_sm):
    """Where the launched variant holds fewer blocks per SM than the splits were sized for (the
    eight-warp rows variant of a verify), or there are several row groups, a block takes
    several splits in turn: the fewest that fit the grid in one wave of that variant (all of
    them where even that does not fit); the splits and their tiles stay those of Qn = 1."""
    for num_indices, tail_len in [(0, 0), (0, 1), (0, 63 * 64 + 5), (1024, 30), (300, 9999), (0, 40000)]:
        tiles, info = plan(batch, kv_heads, q_len, group, 0, num_indices, tail_len, sms, per_sm, launched_per_sm)
        base_tiles, base_info = plan(batch, kv_heads, 1, 1, 0, num_indices, tail_len, sms, per_sm)
        splits, row_groups, per_block, split_blocks = info[0], info[5], info[6], info[7]
        assert info[:3] == base_info[:3] and by_split(tiles) == by_split(base_tiles)
        assert base_info[6:] == [1, splits]  # plain decoding: one split per block
        launched = launched_per_sm or per_sm
        blocks = lambda n: batch * kv_heads * row_groups * n  # noqa: E731
        fits = blocks(split_blocks) <= sms * launched
        fewer_blocks_fit = blocks(-(-splits // (per_block - 1))) <= sms * launched if per_block > 1 else False
        assert split_blocks == -(-splits // per_block) and per_block <= splits
        assert (fits or split_blocks == 1) and not fewer_blocks_fit, (info, launched)
        tiles_of = [0] * splits
        for split, *_ in tiles.tolist():
            tiles_of[split] += 1
        assert [tuple(row[:2]) for row in tiles.tolist()] == blocks_in_order(splits, split_blocks, tiles_of)


@pytest.mark.parametrize("splits_per_block", [1, 2, 3, 5, 7, 100, 256])
def test_forced_splits_per_block(splits_per_block):
    """STD_EXT_DECODE_SPLITS_PER_BLOCK's count, as the op takes it: the blocks enumerate every
    tile once, block by block, split by split (ragged: the first splits hold a tile more)."""
    for tail_len in (0, 1, 64 * 7, 64 * 66 + 1, 64 * 300 + 17):
        tiles, info = plan(1, 2, 1, 7, 0, 0, tail_len, 132, 2, 0, splits_per_block)
        splits, per_block, split_blocks = info[0], info[6], info[7]
        assert splits == 132 and per_block == -(-splits // split_blocks)
        assert split_blocks == -(-splits // min(splits_per_block, splits))
        tiles_of = [len(range(s, -(-tail_len // 64), splits)) for s in range(splits)]
        assert [tuple(row[:2]) for row in tiles.tolist()] == blocks_in_order(splits, split_blocks, tiles_of)
