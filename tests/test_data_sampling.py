"""Balanced batches under BasicSR's own EnlargedSampler + build_dataloader: shares, determinism, ranks, enlarge."""
import collections

import numpy as np
import pytest

import datprl_arch  # noqa: F401
from basicsr.data import build_dataloader, build_dataset
from basicsr.data.data_sampler import EnlargedSampler
from datprl_arch.data.sampling import BalancedSchedule, allocate

from toy import write_pairs

SIZES = [7, 3, 11, 5]


def loader_batches(ds, opt, epochs=1, world=1, rank=0, ratio=1):
    sampler = EnlargedSampler(ds, world, rank, ratio)
    loader = build_dataloader(ds, opt, num_gpu=0, dist=world > 1, sampler=sampler, seed=0)
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out += [(b['source'].tolist(), b['gt_path']) for b in loader]
    return out


@pytest.fixture(scope='module')
def four_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp('sources')
    srcs = []
    for i, n in enumerate(SIZES):
        gt, lq = write_pairs(str(root / f's{i}'), n, (12, 12), seed=i)
        srcs.append(dict(name=f's{i}', domain='d', task=f't{i}', dataroot_gt=gt, dataroot_lq=lq,
                         io_backend={'type': 'disk'}, weight=[1, 2, 1, 4][i]))
    return srcs


def make(srcs, **extra):
    opt = dict(name='t', type='DATPRLMultiDomainDataset', phase='train', gt_size=8, use_hflip=False, use_rot=False,
               batch_size_per_gpu=8, num_worker_per_gpu=0, sampling_seed=11, datasets=srcs)
    opt.update(extra)
    return build_dataset(opt), opt


def test_allocate_gives_floor_or_ceil_of_each_share_and_exact_expectation():
    rng = np.random.default_rng(0)
    probs = np.array([0.1, 0.25, 0.3, 0.35])
    counts = np.array([np.bincount(allocate(6, probs, rng), minlength=4) for _ in range(4000)])
    assert (counts.sum(1) == 6).all()
    assert (counts >= np.floor(6 * probs)).all() and (counts <= np.ceil(6 * probs)).all()
    np.testing.assert_allclose(counts.mean(0) / 6, probs, atol=0.01)


def test_fewer_slots_than_sources_gives_distinct_sources():
    rng = np.random.default_rng(1)
    for _ in range(200):
        slots = allocate(3, np.full(5, 0.2), rng)
        assert len(set(slots.tolist())) == 3


def test_weighted_shares_within_two_points_over_many_batches(four_sources):
    ds, opt = make(four_sources)
    batches = loader_batches(ds, opt, epochs=1, ratio=40)
    counts = collections.Counter(s for sources, _ in batches for s in sources)
    total = sum(counts.values())
    assert len(batches) == len(ds) * 40 // 8
    target = np.array([1, 2, 1, 4]) / 8
    shares = np.array([counts[j] / total for j in range(4)])
    assert np.abs(shares - target).max() < 0.02, shares
    for sources, _ in batches:  # every batch holds each source floor/ceil of its share: 1, 2, 1, 4 of 8
        assert sorted(sources) == [0, 1, 1, 2, 3, 3, 3, 3]


def test_every_image_of_a_source_is_visited(four_sources):
    ds, opt = make(four_sources)
    seen = {p for _, paths in loader_batches(ds, opt, ratio=20) for p in paths}
    assert len(seen) == sum(SIZES)


def test_deterministic_for_a_seed_and_different_for_another(four_sources):
    ds, opt = make(four_sources)
    first = loader_batches(ds, opt, epochs=2, ratio=3)
    again = loader_batches(make(four_sources)[0], opt, epochs=2, ratio=3)
    other = loader_batches(make(four_sources, sampling_seed=12)[0], opt, epochs=2, ratio=3)
    assert first == again
    assert first != other
    per_epoch = len(first) // 2
    assert first[:per_epoch] != first[per_epoch:]  # a new permutation every epoch


def test_ranks_get_different_batches_with_balanced_shares(four_sources):
    ds, opt = make(four_sources)
    ranks = []
    for rank in range(2):
        ds.schedule.rank = rank  # what get_dist_info() reports in a real distributed run
        ranks.append(loader_batches(ds, opt, world=2, rank=rank, ratio=10))
    assert ranks[0] != ranks[1]
    for batches in ranks:
        for sources, _ in batches:
            assert sorted(sources) == [0, 1, 1, 2, 3, 3, 3, 3]


def test_rank_from_the_process_group_enters_the_schedule(four_sources):
    a = BalancedSchedule(SIZES, [1, 1, 1, 1], [1, 1, 1, 1], seed=5, rank=0)
    b = BalancedSchedule(SIZES, [1, 1, 1, 1], [1, 1, 1, 1], seed=5, rank=1)
    draws = [(a.draw_batch(list(range(k, k + 6))), b.draw_batch(list(range(k, k + 6)))) for k in range(0, 60, 6)]
    assert any(x != y for x, y in draws)
    ds, _ = make(four_sources)
    assert ds.schedule.rank == 0  # no process group: rank 0


def test_concat_mode_reproduces_official_concatenation_shares(four_sources):
    srcs = [dict(s, augment_factor=f) for s, f in zip(four_sources, [2, 1, 1, 3])]
    ds, opt = make(srcs, sampling='concat')
    spans = np.array(SIZES) * [2, 1, 1, 3]
    assert len(ds) == spans.sum()
    counts = collections.Counter(s for sources, _ in loader_batches(ds, opt, ratio=1) for s in sources)
    sampler_total = len(ds) // 8 * 8
    assert sum(counts.values()) == sampler_total
    assert abs(counts[3] / sampler_total - spans[3] / spans.sum()) < 0.08


def test_single_index_access_follows_weights_in_expectation(four_sources):
    ds, _ = make(four_sources)
    counts = collections.Counter(ds.locate(i)[0] for i in range(len(ds)))
    shares = np.array([counts[j] for j in range(4)]) / len(ds)
    np.testing.assert_allclose(shares, np.array([1, 2, 1, 4]) / 8, atol=1.5 / len(ds))
