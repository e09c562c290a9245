"""MD-Mini: a reduced build (small blocks, few per source) checked for splits, formats, LMDB and option fragments."""
import json
import os
import os.path as osp

import cv2
import numpy as np
import pytest
import torch
import yaml

import datprl_arch  # noqa: F401
from basicsr.data import build_dataloader, build_dataset
from basicsr.data.data_sampler import EnlargedSampler
from datprl_arch.data import mini
from datprl_arch.data.sources import read_lmdb_meta

SIZE, LIMIT = 48, 3


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('md') / 'md_mini')
    manifest = mini.build(out, seed=0, size=SIZE, limit=LIMIT)
    return out, manifest


def _overlap(a, b):
    (ay, ax, ah, aw), (by, bx, bh, bw) = a, b
    return ay < by + bh and by < ay + ah and ax < bx + bw and bx < ax + aw


def test_every_source_has_train_val_test_in_folders_and_lmdb(built):
    out, manifest = built
    assert sorted(manifest['sources']) == sorted(s.name for s in mini.SOURCES)
    for spec in mini.SOURCES:
        for split in mini.SPLITS:
            names = sorted(b['name'] for b in manifest['sources'][spec.name][split])
            assert names, (spec.name, split)
            folder = osp.join(out, spec.name, split)
            assert sorted(os.listdir(osp.join(folder, 'gt'))) == [n + '.png' for n in names]
            assert sorted(os.listdir(osp.join(folder, 'lq'))) == [n + '.png' for n in names]
            assert sorted(read_lmdb_meta(osp.join(folder, 'lq.lmdb'))) == names
        assert len(manifest['sources'][spec.name]['train']) <= LIMIT


def test_no_test_or_val_block_shares_an_image_or_pixels_with_training(built):
    _, manifest = built
    for key, splits in manifest['splits'].items():
        assert not set(splits['train']) & (set(splits['val']) | set(splits['test'])), key
        assert not set(splits['val']) & set(splits['test']), key
    for spec in mini.SOURCES:
        record = manifest['sources'][spec.name]
        for held in ('val', 'test'):
            for block in record[held]:
                for train in record['train']:
                    assert block['parent'] != train['parent']
                    assert not (block['original'] == train['original'] and _overlap(block['box'], train['box']))
    natural = manifest['splits']['natural']
    for spec in mini.SOURCES:  # one split per domain: a test photo of one task is never a training photo of another
        if spec.domain == 'natural':
            parents = {b['parent'] for b in manifest['sources'][spec.name]['test']}
            assert parents <= set(natural['test'])


def test_deterministic_for_a_seed(built, tmp_path):
    out, manifest = built
    again = mini.build(str(tmp_path / 'again'), seed=0, size=SIZE, limit=LIMIT, sources=['natural_derain'])
    assert again['sources']['natural_derain'] == manifest['sources']['natural_derain']
    name = manifest['sources']['natural_derain']['train'][0]['name'] + '.png'
    a = open(osp.join(out, 'natural_derain', 'train', 'lq', name), 'rb').read()
    b = open(tmp_path / 'again' / 'natural_derain' / 'train' / 'lq' / name, 'rb').read()
    assert a == b
    other = mini.build(str(tmp_path / 'other'), seed=1, size=SIZE, limit=LIMIT, sources=['natural_derain'])
    assert other['splits'] != again['splits'] or other['sources'] != again['sources']


def test_medical_is_16bit_gray_and_others_8bit_colour(built):
    out, manifest = built
    for spec in mini.SOURCES:
        name = manifest['sources'][spec.name]['test'][0]['name'] + '.png'
        for side in ('gt', 'lq'):
            img = cv2.imread(osp.join(out, spec.name, 'test', side, name), cv2.IMREAD_UNCHANGED)
            if spec.domain == 'medical':
                assert img.dtype == np.uint16 and img.ndim == 2, spec.name
                assert img.max() > 255
            else:
                assert img.dtype == np.uint8 and img.shape[2] == 3, spec.name


def test_lq_differs_from_gt_as_its_task_says(built):
    out, manifest = built
    for spec in mini.SOURCES:
        name = manifest['sources'][spec.name]['train'][0]['name'] + '.png'
        gt, lq = (cv2.imread(osp.join(out, spec.name, 'train', s, name), cv2.IMREAD_UNCHANGED).astype(np.float64)
                  for s in ('gt', 'lq'))
        scale = 65535.0 if spec.bit_depth == 16 else 255.0
        assert gt.shape == lq.shape
        error = np.abs(gt - lq).mean() / scale
        assert 0.003 < error < 0.5, (spec.name, error)
        if spec.task in ('sr4', 'deblur', 'mri_sr4'):  # these remove high frequencies
            assert np.abs(np.diff(lq, axis=0)).mean() < np.abs(np.diff(gt, axis=0)).mean(), spec.name


def test_descriptions_are_template_labelled_and_cover_every_image(built):
    out, manifest = built
    for spec in mini.SOURCES:
        data = json.load(open(osp.join(out, spec.name, 'descriptions.json')))
        assert data['__generator__'].startswith('template')
        names = {b['name'] + '.png' for split in mini.SPLITS for b in manifest['sources'][spec.name][split]}
        assert set(data) - {'__generator__'} == names
        assert all(data[n].startswith('[template] ') for n in names)


def test_option_fragments_build_through_basicsr(built):
    out, _ = built
    train_opt = yaml.safe_load(open(osp.join(out, 'options_train.yml')))['datasets']
    test_opt = yaml.safe_load(open(osp.join(out, 'options_test.yml')))['datasets']
    assert sorted(test_opt) == sorted(f'test_{s.name}' for s in mini.SOURCES)
    opt = dict(train_opt['train'], phase='train', batch_size_per_gpu=9, num_worker_per_gpu=0, sampling_seed=0,
               gt_size=SIZE * 2 // 3 // 4 * 4)
    ds = build_dataset(opt)
    batch = next(iter(build_dataloader(ds, opt, num_gpu=0, sampler=EnlargedSampler(ds, 1, 0, 1), seed=0)))
    assert sorted(batch['source'].tolist()) == list(range(9))
    assert batch['lq'].shape == (9, 3, opt['gt_size'], opt['gt_size'])
    assert sorted(set(batch['domain_name'])) == ['medical', 'natural', 'remote_sensing']
    assert all(d.startswith('[template]') for d in batch['description'])
    val = build_dataset(dict(train_opt['val_medical_ct_denoise'], phase='val'))
    item = val[0]
    assert (item['domain_name'], item['task_name'], item['bit_depth'], item['channels']) == \
        ('medical', 'ct_denoise', 16, 1)
    assert item['task'] == ds.tasks.index('ct_denoise') and item['domain'] == ds.domains.index('medical')
    test = build_dataset(dict(test_opt['test_rs_dehaze'], phase='test'))
    assert torch.is_tensor(test[0]['gt']) and len(test) >= 1


def test_existing_build_is_reused_and_a_different_one_refused(built):
    out, manifest = built
    stamp = os.path.getmtime(osp.join(out, 'manifest.json'))
    assert mini.build(out, seed=0, size=SIZE, limit=LIMIT) == manifest
    assert os.path.getmtime(osp.join(out, 'manifest.json')) == stamp
    with pytest.raises(FileExistsError, match='pass --overwrite'):
        mini.build(out, seed=5, size=SIZE, limit=LIMIT)


def test_default_build_stays_under_100_mb(tmp_path):
    out = str(tmp_path / 'full')
    manifest = mini.build(out, seed=0)
    total = sum(osp.getsize(osp.join(d, f)) for d, _, files in os.walk(out) for f in files)
    assert total < 100e6
    assert all(len(manifest['sources'][s.name]['train']) >= 2 for s in mini.SOURCES)
