"""The multi-domain dataset: decoding, channels, upsampled LQ, labels, descriptions, official options, real loader."""
import json
import random

import cv2
import numpy as np
import pytest
import torch

import datprl_arch  # noqa: F401  (registration, compat)
from basicsr.data import build_dataloader, build_dataset
from basicsr.data.data_sampler import EnlargedSampler
from basicsr.utils.registry import DATASET_REGISTRY
from datprl_arch.data import image_io
from datprl_arch.data.multidomain_dataset import DATPRLMultiDomainDataset, crop_upsampled, upsample
from datprl_arch.data.sources import DataSourceError

from toy import write_pairs


def source(name, dirs, domain='natural', task=None, **extra):
    return dict(name=name, domain=domain, task=task or name, dataroot_gt=dirs[0], dataroot_lq=dirs[1],
                io_backend={'type': 'disk'}, **extra)


def dataset(sources, phase='val', **opt):
    return build_dataset(dict(name='t', type='DATPRLMultiDomainDataset', phase=phase, datasets=sources,
                              sampling_seed=0, **opt))


def test_registered_under_our_name_and_official_aliases():
    for name in ('DATPRLMultiDomainDataset', 'MultiDatasetPairedImageDataset', 'MultiTaskAllInOneDataset'):
        assert DATASET_REGISTRY.get(name) is DATPRLMultiDomainDataset


def test_16bit_gray_keeps_its_range_and_is_replicated(tmp_path):
    dirs = write_pairs(str(tmp_path), 2, (40, 48), bit_depth=16, channels=1)
    item = dataset([source('ct', dirs, 'medical')])[1]
    raw = cv2.imread(f'{dirs[0]}/img001.png', cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and raw.max() > 255
    assert item['gt'].shape == (3, 40, 48)
    expected = torch.from_numpy(raw.astype(np.float32) / 65535.0)
    for c in range(3):
        assert torch.equal(item['gt'][c], expected)
    assert (item['bit_depth'], item['channels']) == (16, 1)
    back = image_io.tensor_to_stored(item['gt'], image_io.ImageFormat(item['bit_depth'], item['channels']))
    assert back.dtype == np.uint16 and np.array_equal(back, raw)


def test_colour_to_one_channel_is_luma(tmp_path):
    dirs = write_pairs(str(tmp_path), 1, (32, 32), channels=3)
    item = dataset([source('a', dirs)], channels=1)[0]
    bgr = cv2.imread(f'{dirs[1]}/img000.png').astype(np.float32) / 255.0
    assert item['lq'].shape == (1, 32, 32)
    np.testing.assert_allclose(item['lq'][0].numpy(), cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), atol=1e-6)
    back = image_io.tensor_to_stored(item['lq'].expand(3, -1, -1), image_io.ImageFormat(8, 3))
    assert back.shape == (32, 32, 3) and back.dtype == np.uint8


def test_8bit_colour_is_rgb_in_unit_range(tmp_path):
    dirs = write_pairs(str(tmp_path), 1, (24, 40))
    item = dataset([source('a', dirs)])[0]
    bgr = cv2.imread(f'{dirs[0]}/img000.png')
    assert torch.equal(item['gt'], torch.from_numpy(bgr[..., ::-1].astype(np.float32).transpose(2, 0, 1) / 255.0))


def test_small_lq_is_upsampled_bicubically_to_gt_size(tmp_path):
    dirs = write_pairs(str(tmp_path), 2, (64, 48), scale=4)
    item = dataset([source('sr', dirs, scale=4, upsample_lq=True)])[0]
    lq = cv2.imread(f'{dirs[1]}/img000.png').astype(np.float32) / 255.0
    assert lq.shape == (16, 12, 3)
    expected = np.clip(cv2.resize(lq, (48, 64), interpolation=cv2.INTER_CUBIC), 0, 1)
    assert item['lq'].shape == item['gt'].shape == (3, 64, 48)
    np.testing.assert_allclose(item['lq'].numpy(), expected[..., ::-1].transpose(2, 0, 1), atol=1e-6)


def test_crop_of_upsampled_region_equals_crop_of_full_upsample():
    rng = np.random.default_rng(0)
    lq = rng.random((30, 41, 1), dtype=np.float32)
    gt = rng.random((120, 164, 1), dtype=np.float32)
    full = upsample(lq, 4)
    for seed in range(25):
        random.seed(seed)
        g, low = crop_upsampled(gt, lq, 36, 4)
        random.seed(seed)
        top, left = random.randint(0, 120 - 36), random.randint(0, 164 - 36)
        assert np.array_equal(g, gt[top:top + 36, left:left + 36])
        np.testing.assert_allclose(low, full[top:top + 36, left:left + 36], atol=1e-6)


def test_labels_follow_option_order_or_declared_vocabularies(tmp_path):
    a = write_pairs(str(tmp_path / 'a'), 1, (16, 16))
    b = write_pairs(str(tmp_path / 'b'), 1, (16, 16), bit_depth=16, channels=1)
    c = write_pairs(str(tmp_path / 'c'), 1, (16, 16))
    srcs = [source('rain', a, 'natural', 'derain'), source('mri', b, 'medical', 'sr4'),
            source('sat', c, 'remote_sensing', 'sr4')]
    ds = dataset(srcs)
    assert ds.domains == ['natural', 'medical', 'remote_sensing'] and ds.tasks == ['derain', 'sr4']
    labels = [(ds[i]['source'], ds[i]['domain'], ds[i]['task']) for i in range(3)]
    assert labels == [(0, 0, 0), (1, 1, 1), (2, 2, 1)]
    fixed = dataset(srcs[2:], domains=['natural', 'medical', 'remote_sensing'], tasks=['derain', 'sr4'])
    item = fixed[0]
    assert (item['source'], item['domain'], item['task']) == (0, 2, 1)
    assert (item['domain_name'], item['task_name'], item['source_name']) == ('remote_sensing', 'sr4', 'sat')
    with pytest.raises(DataSourceError, match=r"domain 'remote_sensing' is not in the declared domains list"):
        dataset(srcs[2:], domains=['natural'])


def test_descriptions_are_attached_by_image_name(tmp_path):
    dirs = write_pairs(str(tmp_path), 2, (16, 16))
    desc = tmp_path / 'desc.json'
    desc.write_text(json.dumps({'__generator__': 'template', 'img000.png': 'a rainy street'}))
    ds = dataset([source('a', dirs, descriptions=str(desc))])
    assert [ds[i]['description'] for i in range(2)] == ['a rainy street', '']


def test_official_option_file_defaults_task_to_name_and_one_shared_domain(tmp_path):
    a = write_pairs(str(tmp_path / 'a'), 2, (16, 16))
    b = write_pairs(str(tmp_path / 'b'), 2, (16, 16))
    official = [dict(name=n, dataroot_gt=d[0], dataroot_lq=d[1], io_backend={'type': 'disk'}, filename_tmpl='{}',
                     augment_factor=3, weight=1.0) for n, d in (('Rain100L', a), ('DF2K', b))]
    ds = build_dataset(dict(name='6T', type='MultiDatasetPairedImageDataset', phase='train', scale=1, gt_size=8,
                            use_hflip=True, use_rot=True, batch_size=6, datasets=official))
    assert ds.tasks == ['Rain100L', 'DF2K'] and ds.domains == ['shared']
    assert len(ds) == 12  # sum of n_j * augment_factor_j, as in the official code
    with pytest.raises(DataSourceError, match=r"\[Rain100L\] missing key 'domain'"):
        build_dataset(dict(name='ours', type='DATPRLMultiDomainDataset', phase='train', gt_size=8, datasets=official))


def test_official_y_channel_and_normalisation(tmp_path):
    dirs = write_pairs(str(tmp_path), 1, (16, 16))
    item = dataset([source('a', dirs)], color='y', mean=[0.5], std=[0.5])[0]
    bgr = cv2.imread(f'{dirs[0]}/img000.png').astype(np.float32) / 255.0
    from basicsr.utils import bgr2ycbcr
    np.testing.assert_allclose(item['gt'][0].numpy(), (bgr2ycbcr(bgr, y_only=True) - 0.5) / 0.5, atol=1e-5)


def test_training_batches_through_basicsr_loader_with_workers(tmp_path):
    a = write_pairs(str(tmp_path / 'a'), 3, (40, 40))
    b = write_pairs(str(tmp_path / 'b'), 2, (36, 44), bit_depth=16, channels=1)
    c = write_pairs(str(tmp_path / 'c'), 2, (64, 64), scale=4)
    opt = dict(name='t', type='DATPRLMultiDomainDataset', phase='train', gt_size=32, use_hflip=True, use_rot=True,
               batch_size_per_gpu=6, num_worker_per_gpu=2, sampling_seed=3,
               datasets=[source('a', a), source('b', b, 'medical'), source('c', c, scale=4, upsample_lq=True)])
    ds = build_dataset(opt)
    loader = build_dataloader(ds, opt, num_gpu=0, dist=False, sampler=EnlargedSampler(ds, 1, 0, 4), seed=0)
    batches = list(loader)
    assert len(batches) == len(ds) * 4 // 6
    for batch in batches:
        assert batch['lq'].shape == batch['gt'].shape == (6, 3, 32, 32)
        assert sorted(batch['source'].tolist()) == [0, 0, 1, 1, 2, 2]
        assert batch['lq'].dtype == torch.float32 and 0 <= batch['lq'].min() and batch['lq'].max() <= 1
