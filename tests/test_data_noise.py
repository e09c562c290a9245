"""Synthetic-noise sources (``mode: noise``): LQ = GT + Gaussian noise, fresh per training crop, repeatable in
validation/test (the official natural denoising setting, sigma 15/25/50)."""
import numpy as np
import pytest

import datprl_arch  # noqa: F401
from datprl_arch.data.multidomain_dataset import DATPRLMultiDomainDataset, add_noise
from datprl_arch.data.sources import DataSourceError

from toy import write_pairs

SIGMA = 25


def noise_source(gt_dir, **extra):
    return dict(dict(name='denoise25', domain='natural', task='denoise', dataroot_gt=gt_dir, mode='noise',
                     sigma=SIGMA, io_backend={'type': 'disk'}), **extra)


def build(sources, phase, **opt):
    return DATPRLMultiDomainDataset(dict(name=f'noise_{phase}', phase=phase, scale=1, datasets=sources, **opt))


@pytest.fixture
def clean(tmp_path):
    return write_pairs(str(tmp_path / 'clean'), count=3, size=(64, 64))[0]


def test_training_noise_has_the_declared_std_and_is_fresh_per_draw(clean):
    data = build([noise_source(clean)], 'train', gt_size=48)
    first, second = data.load(0, 0), data.load(0, 0)
    residual = (first['lq'] - first['gt']).numpy()
    assert first['lq_path'] == first['gt_path'] and first['lq'].shape == (3, 48, 48)
    assert residual.std() == pytest.approx(SIGMA / 255, rel=0.1)
    assert np.allclose(first['lq'].numpy() * 255, np.round(first['lq'].numpy() * 255), atol=1e-3)  # 8-bit levels
    assert not np.array_equal(first['lq'].numpy() - first['gt'].numpy(), second['lq'].numpy() - second['gt'].numpy())


def test_validation_noise_is_repeatable_and_differs_between_images(clean):
    data = build([noise_source(clean)], 'val')
    a, again, b = data.load(0, 0), data.load(0, 0), data.load(0, 1)
    assert np.array_equal(a['lq'].numpy(), again['lq'].numpy())
    assert not np.array_equal((a['lq'] - a['gt']).numpy(), (b['lq'] - b['gt']).numpy())


def test_noise_sources_mix_with_paired_sources(clean, tmp_path):
    gt, lq = write_pairs(str(tmp_path / 'rain'), count=2, size=(64, 64), seed=3)
    paired = dict(name='rain', domain='natural', task='derain', dataroot_gt=gt, dataroot_lq=lq)
    data = build([noise_source(clean), paired], 'train', gt_size=32)
    assert [s.name for s in data.sources] == ['denoise25', 'rain'] and data.tasks == ['denoise', 'derain']


@pytest.mark.parametrize('change,message', [
    (dict(sigma=None), "missing key 'sigma'"),
    (dict(sigma=-5), 'sigma must be a positive number'),
    (dict(mode='blur'), "mode 'blur' is not supported; use 'paired'"),
])
def test_bad_noise_sources_are_reported(clean, change, message):
    entry = {k: v for k, v in noise_source(clean, **change).items() if v is not None}
    with pytest.raises(DataSourceError, match=message):
        build([entry], 'val')


def test_add_noise_quantises_to_16_bit():
    img = np.full((8, 8, 1), 0.5, dtype=np.float32)
    noisy = add_noise(img, 15, 16, np.random.default_rng(0))
    assert noisy.dtype == np.float32 and np.allclose(noisy * 65535, np.round(noisy * 65535), atol=1e-2)
