"""Synthesised sources (``mode: synth``): fresh LQ per training crop from a registered degradation, repeatable in
val/test, photometric jitter, clear errors; and the input-error weighting of the pixel loss."""
import random

import numpy as np
import pytest
import torch

import datprl_arch  # noqa: F401
from basicsr.losses.basic_loss import L1Loss
from datprl_arch.data import degradations as deg
from datprl_arch.data.multidomain_dataset import DATPRLMultiDomainDataset, photometric_jitter, synth_crop
from datprl_arch.data.sources import DataSourceError
from datprl_arch.losses.pixel_weighting import error_weights

from toy import write_pairs

KINDS = {'sr': {'kernel': ['bicubic', 'area']}, 'rain': {'length': [8, 30]}, 'motion_blur': {'size': [7, 15]},
         'kspace_sr': {'window': ['box', 'hamming']}, 'ct_low_dose': {'photons': [2e3, 4e3]}, 'low_count': {},
         'clouds': {}, 'haze': {}, 'identity': {}}


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp('synth')
    return (write_pairs(str(root / 'rgb'), count=2, size=(96, 96))[0],
            write_pairs(str(root / 'gray16'), count=2, size=(96, 96), bit_depth=16, channels=1)[0])


def sources(folders, **params):
    rgb, gray = folders
    return [dict(name=k, domain='d', task=k, dataroot_gt=gray if k in ('ct_low_dose', 'low_count') else rgb,
                 mode='synth', degradation=dict(type=k, **params.get(k, KINDS[k]))) for k in KINDS]


def test_training_crops_are_synthesised_afresh_for_every_draw(folders):
    data = DATPRLMultiDomainDataset(dict(name='t', phase='train', scale=1, datasets=sources(folders), gt_size=32))
    for index, kind in enumerate(KINDS):
        first, second = data.load(index, 0), data.load(index, 0)
        assert first['lq'].shape == first['gt'].shape == (3, 32, 32) and first['lq_path'] == first['gt_path']
        if kind == 'identity':
            assert torch.equal(first['lq'], first['gt'])
            continue
        assert (first['lq'] - first['gt']).abs().mean() > 1e-3, kind
        assert not torch.equal(first['lq'], second['lq']), kind


def test_validation_pairs_are_repeatable_per_image_and_match_the_degradation(folders):
    data = DATPRLMultiDomainDataset(dict(name='v', phase='val', scale=1, datasets=sources(folders)))
    rain = list(KINDS).index('rain')
    a, again, other = data.load(rain, 0), data.load(rain, 0), data.load(rain, 1)
    assert torch.equal(a['lq'], again['lq']) and a['lq'].shape == (3, 96, 96)
    assert not torch.equal(a['lq'] - a['gt'], other['lq'] - other['gt'])


def test_a_training_crop_sees_real_context_not_a_border():
    """Blur near the crop edge equals blur of the whole image: the margin gives the kernel real pixels."""
    rng = np.random.default_rng(0)
    img = rng.random((96, 96, 3)).astype(np.float32)
    stored = (img * 255).round().astype(np.uint8)
    seed = 7
    random.seed(seed)
    gt, lq = synth_crop(stored, 32, 'motion_blur', {'size': 9}, np.random.default_rng(1))
    assert gt.shape == lq.shape == (32, 32, 3)
    random.seed(seed)
    margin = deg.DEGRADATIONS['motion_blur'].margin
    top, left = random.randint(0, 96 - 32 - 2 * margin), random.randint(0, 96 - 32 - 2 * margin)
    region = stored[top:top + 32 + 2 * margin, left:left + 32 + 2 * margin].astype(np.float32) / 255
    _, full = deg.degrade('motion_blur', region, np.random.default_rng(1), {'size': 9})
    assert np.allclose(lq, full[margin:margin + 32, margin:margin + 32], atol=1e-6)


def test_photometric_jitter_stays_in_range_and_changes_the_image():
    img = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    out = photometric_jitter(img, np.random.default_rng(1), brightness=0.2, contrast=0.2, gamma=0.3, saturation=0.3)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1 and not np.allclose(out, img)
    assert np.allclose(photometric_jitter(img, np.random.default_rng(1)), img, atol=1e-6)  # all zero: unchanged


def test_parameters_are_drawn_from_ranges_and_choices():
    rng = np.random.default_rng(0)
    assert deg.draw(rng, 3) == 3 and deg.draw(rng, 'box') == 'box'
    assert all(2 <= deg.draw(rng, [2, 5]) <= 5 for _ in range(20))
    assert {deg.draw(rng, ['a', 'b']) for _ in range(30)} == {'a', 'b'}


@pytest.mark.parametrize('degradation,message', [
    ({'type': 'fog'}, "unknown degradation type 'fog'"),
    ({'type': 'rain', 'lenght': [1, 2]}, "no parameter 'lenght'"),
    ({'type': 'rain', 'length': [30, 10]}, 'low > high'),
    ({'type': 'haze', 'beta': [0.1, 0.2, 0.3]}, 'must be a number, \\[low, high\\]'),
    ('rain', 'must be a mapping with a type'),
])
def test_bad_degradation_specs_are_named(folders, degradation, message):
    src = dict(name='bad_src', domain='d', task='t', dataroot_gt=folders[0], mode='synth', degradation=degradation)
    with pytest.raises(DataSourceError, match=message) as err:
        DATPRLMultiDomainDataset(dict(name='t', phase='train', scale=1, datasets=[src], gt_size=32))
    assert '[bad_src]' in str(err.value)


def test_synth_needs_a_degradation_and_photometric_keys_are_checked(folders):
    src = dict(name='s', domain='d', task='t', dataroot_gt=folders[0], mode='synth')
    with pytest.raises(DataSourceError, match="missing key 'degradation'"):
        DATPRLMultiDomainDataset(dict(name='t', phase='train', scale=1, datasets=[src], gt_size=32))
    src['degradation'] = {'type': 'identity'}
    with pytest.raises(DataSourceError, match='photometric must map some of'):
        DATPRLMultiDomainDataset(dict(name='t', phase='train', scale=1, datasets=[src], gt_size=32,
                                      photometric={'brightnes': 0.1}))


def test_error_weights_equalise_tasks_in_basicsr_l1():
    gt = torch.zeros(2, 3, 4, 4)
    lq = torch.stack([torch.full((3, 4, 4), 0.5), torch.full((3, 4, 4), 0.01)])  # a hard and an easy input
    weights = error_weights(lq, gt, floor=0.02)
    assert weights.shape == (2, 1, 4, 4)
    assert torch.allclose(weights[:, 0, 0, 0], torch.tensor([1 / 0.5, 1 / 0.02]))  # the easy one hits the floor
    out = torch.stack([torch.full((3, 4, 4), 0.25), torch.full((3, 4, 4), 0.02)])  # both keep part of the error
    loss = L1Loss()(out, gt, weight=weights)
    expected = (2 * 0.25 + 50 * 0.02) / (2 + 50)
    assert loss.item() == pytest.approx(expected)
    up = error_weights(torch.full((1, 3, 2, 2), 0.1), torch.zeros(1, 3, 4, 4))
    assert up.shape == (1, 1, 4, 4) and torch.allclose(up, torch.tensor(10.0))
