"""The benchmark against the input: scoring equal to BasicSR's functions (8-bit, native 16-bit, Y channel, crop
border), the statistics, the model's validation at native depth, and the command end to end on tiny disk and LMDB
sets (8-bit colour, 16-bit gray) with two checkpoints of different networks."""
import csv
import errno
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
from collections import OrderedDict

import cv2
import numpy as np
import pytest
import torch
import yaml

import datprl_arch  # noqa: F401
from basicsr.archs import build_network
from basicsr.data import build_dataloader, build_dataset
from basicsr.metrics import calculate_psnr, calculate_ssim
from basicsr.models import build_model
from basicsr.utils import img2tensor, tensor2img
from basicsr.utils.registry import MODEL_REGISTRY
from datprl_arch.benchmark import main as benchmark_main
from datprl_arch.data.lmdb.writer import make_paired_lmdb
from datprl_arch.evaluation import samples as samples_module
from datprl_arch.evaluation.aggregate import aggregates, summarize_set, t_quantile_975
from datprl_arch.evaluation.metrics import EIGHT_BIT, NATIVE, score, upsample_to
from datprl_arch.evaluation.runner import BenchmarkError, run_benchmark
from datprl_arch.utils import folders, precision
from datprl_arch.utils.atomic import atomic_write_json

from networks import SMALL_PROMPTS
from toy import write_pairs

ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
TIMEOUT_S = 120
BF16_PSNR_TOLERANCE_DB = 0.5  # bf16 autocast vs float32 on the tiny network (a real network: see docs/benchmarks.md)
# The option file's network; checkpoint 'tuned' is one of these without network options.
DATPRL_NET = SMALL_PROMPTS
# Checkpoint 'plain' is this other network and carries its options.
RESTORMER_NET = dict(type='PaddedRestormer', dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
                     heads=[1, 1, 1, 1])
PSNR_Y = {'type': 'calculate_psnr', 'crop_border': 2, 'test_y_channel': True}
SSIM_Y = {'type': 'calculate_ssim', 'crop_border': 2, 'test_y_channel': True}


def tensor_of(stored: np.ndarray) -> torch.Tensor:
    """A stored uint8/uint16 image (H, W[, C], BGR) as the dataset gives it: [1, C, H, W] RGB in [0, 1]."""
    img = stored[..., None] if stored.ndim == 2 else stored
    return img2tensor(img.astype(np.float32) / np.iinfo(stored.dtype).max, bgr2rgb=True, float32=True)[None]


def smooth(rng, shape, dtype):
    top = np.iinfo(dtype).max
    coarse = rng.random((4, 4, shape[2] if len(shape) == 3 else 1)).astype(np.float32)
    img = cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR).reshape(shape)
    return (img * top).round().astype(dtype)


def noisy(rng, img, amplitude):
    top = np.iinfo(img.dtype).max
    return np.clip(img.astype(np.int64) + rng.integers(-amplitude, amplitude + 1, img.shape), 0, top).astype(img.dtype)


# ------------------------------------------------------------------ scoring
@pytest.mark.parametrize('crop_border, y_channel', [(0, False), (2, True), (3, False)])
def test_8bit_scores_equal_basicsr(crop_border, y_channel):
    rng = np.random.default_rng(0)
    gt = smooth(rng, (24, 30, 3), np.uint8)
    out = noisy(rng, gt, 9)
    opts = {'psnr': {'type': 'calculate_psnr', 'crop_border': crop_border, 'test_y_channel': y_channel},
            'ssim': {'type': 'calculate_ssim', 'crop_border': crop_border, 'test_y_channel': y_channel}}
    expected = {'psnr': calculate_psnr(out, gt, crop_border, test_y_channel=y_channel),
                'ssim': calculate_ssim(out, gt, crop_border, test_y_channel=y_channel)}
    for bits in (NATIVE, EIGHT_BIT):  # an 8-bit source is scored as BasicSR does either way
        got = score(tensor_of(out), tensor_of(gt), opts, bit_depth=8, metric_bits=bits)
        assert got == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.parametrize('opts', [{'psnr': {'type': 'calculate_psnr', 'crop_border': 0},
                                   'ssim': {'type': 'calculate_ssim', 'crop_border': 0}},
                                  {'psnr': PSNR_Y, 'ssim': SSIM_Y}])
def test_16bit_native_and_8bit_scores(opts):
    rng = np.random.default_rng(1)
    gt = smooth(rng, (28, 26), np.uint16)
    out = noisy(rng, gt, 300)
    t_out, t_gt = tensor_of(out), tensor_of(gt)
    native = score(t_out, t_gt, opts, bit_depth=16, metric_bits=NATIVE)
    scale = 255.0 / 65535.0
    expected = {name: (calculate_psnr if o['type'] == 'calculate_psnr' else calculate_ssim)(
        out * scale, gt * scale, o['crop_border'], test_y_channel=o.get('test_y_channel', False))
        for name, o in opts.items()}
    assert native == pytest.approx(expected, rel=1e-9)
    if not opts['psnr'].get('test_y_channel'):  # native PSNR is the PSNR of the stored values at peak 65535
        mse = np.mean((out.astype(np.float64) - gt) ** 2)
        assert native['psnr'] == pytest.approx(10 * math.log10(65535.0 ** 2 / mse), rel=1e-12)
    eight = score(t_out, t_gt, opts, bit_depth=16, metric_bits=EIGHT_BIT)
    a, b = tensor2img(t_out), tensor2img(t_gt)
    assert eight['psnr'] == calculate_psnr(a, b, opts['psnr']['crop_border'],
                                           test_y_channel=opts['psnr'].get('test_y_channel', False))
    assert eight['ssim'] == calculate_ssim(a, b, opts['ssim']['crop_border'],
                                           test_y_channel=opts['ssim'].get('test_y_channel', False))
    assert abs(eight['psnr'] - native['psnr']) > 0.01  # the 8-bit cut loses what native keeps


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_seen():
    """Warnings of BasicSR's root logger (it does not propagate to pytest's caplog)."""
    handler, logger = ListHandler(), logging.getLogger('basicsr')
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def test_small_images_have_no_ssim_and_a_warning(warnings_seen):
    rng = np.random.default_rng(2)
    gt = smooth(rng, (10, 40, 3), np.uint8)
    opts = {'psnr': {'type': 'calculate_psnr', 'crop_border': 0}, 'ssim': {'type': 'calculate_ssim', 'crop_border': 0}}
    got = score(tensor_of(noisy(rng, gt, 5)), tensor_of(gt), opts, image='tiny.png')
    assert got['ssim'] is None and math.isfinite(got['psnr'])
    assert any('tiny.png' in m and 'ssim skipped' in m for m in warnings_seen)
    big = smooth(rng, (14, 14, 3), np.uint8)  # 14 - 2 * 2 = 10 < 11 after the crop border
    assert score(tensor_of(big), tensor_of(big), {'ssim': SSIM_Y}, image='cropped.png')['ssim'] is None
    assert score(tensor_of(big), tensor_of(big), {'psnr': PSNR_Y}, image='same.png')['psnr'] is None  # inf
    assert any('same.png' in m for m in warnings_seen)


def test_input_upsampling_is_opencv_bicubic():
    rng = np.random.default_rng(3)
    lq = rng.random((6, 5, 3)).astype(np.float32)
    up = upsample_to(img2tensor(lq, bgr2rgb=False)[None], (12, 10))
    expected = np.clip(cv2.resize(lq, (10, 12), interpolation=cv2.INTER_CUBIC), 0, 1)
    assert up.shape == (1, 3, 12, 10)
    assert np.allclose(up[0].numpy().transpose(1, 2, 0), expected, atol=1e-7)


# ------------------------------------------------------------------ statistics
def test_set_statistics_by_hand():
    scores = [{'psnr_in': 20.0, 'psnr_out': 21.0, 'ssim_in': 0.5, 'ssim_out': 0.6},
              {'psnr_in': 22.0, 'psnr_out': 25.0, 'ssim_in': None, 'ssim_out': 0.9},
              {'psnr_in': 24.0, 'psnr_out': 26.0, 'ssim_in': 0.7, 'ssim_out': 0.75}]
    row = summarize_set(scores)
    assert row['n_images'] == 3 and row['n_psnr'] == 3 and row['n_ssim'] == 2
    assert row['psnr_in'] == pytest.approx(22.0) and row['psnr_out'] == pytest.approx(24.0)
    assert row['gain_psnr'] == pytest.approx(2.0)  # gains 1, 3, 2
    assert row['psnr_std'] == pytest.approx(math.sqrt(7.0))  # outputs 21, 25, 26: (9 + 1 + 4) / 2
    assert row['psnr_in_std'] == pytest.approx(2.0)
    assert row['gain_psnr_std'] == pytest.approx(1.0)
    half = 4.303 / math.sqrt(3)  # t(0.975, 2 df)
    assert row['gain_psnr_ci95'] == pytest.approx([2.0 - half, 2.0 + half])
    # SSIM: the image without an input SSIM is left out of both sides
    assert row['ssim_in'] == pytest.approx(0.6) and row['ssim_out'] == pytest.approx(0.675)
    assert row['gain_ssim'] == pytest.approx(0.075)
    half = 12.706 * math.sqrt(0.05 ** 2 / 2) / math.sqrt(2)  # gains 0.1, 0.05; t(0.975, 1 df)
    assert row['gain_ssim_ci95'] == pytest.approx([0.075 - half, 0.075 + half])
    clean = summarize_set([{'psnr_in': None, 'psnr_out': 40.0}, {'psnr_in': None, 'psnr_out': 42.0}])
    assert clean['psnr_in'] is None and clean['gain_psnr'] is None and clean['psnr_out'] == pytest.approx(41.0)
    single = summarize_set(scores[:1])
    assert single['psnr_std'] is None and single['gain_psnr_ci95'] is None and single['gain_psnr'] == 1.0
    assert t_quantile_975(35) == 2.042 and t_quantile_975(10 ** 5) == 1.96


def test_aggregates_per_task_domain_overall():
    def row(checkpoint, name, domain, task, psnr_in, psnr_out, n):
        return {'checkpoint': checkpoint, 'set': name, 'domain': domain, 'task': task, 'n_images': n,
                'psnr_in': psnr_in, 'psnr_out': psnr_out, 'gain_psnr': psnr_out - psnr_in,
                'ssim_in': 0.5, 'ssim_out': None if name == 'c' else 0.7, 'gain_ssim': None if name == 'c' else 0.2}

    rows = [row('A', 'a', 'natural', 'derain', 20, 24, 2), row('A', 'b', 'natural', 'sr', 30, 31, 3),
            row('A', 'c', 'medical', 'sr', 40, 46, 5), row('B', 'a', 'natural', 'derain', 20, 20, 2)]
    agg = aggregates(rows)
    by = {(a['checkpoint'], a['level'], a['group']): a for level in agg.values() for a in level}
    assert by['A', 'domain', 'natural']['psnr_out'] == pytest.approx(27.5)
    assert by['A', 'domain', 'natural']['gain_psnr'] == pytest.approx(2.5)
    assert by['A', 'domain', 'natural']['n_sets'] == 2 and by['A', 'domain', 'natural']['n_images'] == 5
    assert by['A', 'task', 'sr']['psnr_in'] == pytest.approx(35.0)
    assert by['A', 'task', 'sr']['ssim_out'] == pytest.approx(0.7)  # set c has no SSIM: left out, not NaN
    assert by['A', 'overall', 'all']['psnr_out'] == pytest.approx((24 + 31 + 46) / 3)
    assert by['A', 'overall', 'all']['n_images'] == 10
    assert by['B', 'overall', 'all']['gain_psnr'] == 0.0 and by['B', 'overall', 'all']['n_sets'] == 1


def test_json_is_strict(tmp_path):
    path = str(tmp_path / 'm.json')
    atomic_write_json(OrderedDict(a=float('nan'), b=[1.0, float('inf')], c={'d': (2.0, -float('inf'))}), path)
    text = open(path).read()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f'bare {c}')) == {
        'a': None, 'b': [1.0, None], 'c': {'d': [2.0, None]}}


# ------------------------------------------------------------------ the model's validation
def _source(name, domain, task, root, backend='disk'):
    suffix = '.lmdb' if backend == 'lmdb' else ''
    return dict(name=name, domain=domain, task=task, dataroot_gt=str(root / f'gt{suffix}'),
                dataroot_lq=str(root / f'lq{suffix}'), io_backend={'type': backend})


def _test_opt(tmp_path, datasets, metric_bits=None):
    val = {'save_img': False, 'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0},
                                          'ssim': {'type': 'calculate_ssim', 'crop_border': 0}}}
    if metric_bits is not None:
        val['metric_bits'] = metric_bits
    results = tmp_path / f'results_{metric_bits}'
    return dict(name=f'val_{metric_bits}', model_type='DATPRLModel', scale=1, num_gpu=0, is_train=False, dist=False,
                rank=0, world_size=1, datasets=datasets, network_g=dict(DATPRL_NET), val=val,
                path={'pretrain_network_g': None, 'results_root': str(results), 'visualization': str(results)})


def test_validation_scores_16bit_at_native_depth_and_writes_strict_json(tmp_path, warnings_seen):
    write_pairs(str(tmp_path / 'ct'), count=2, size=(16, 20), bit_depth=16, channels=1, seed=4)
    write_pairs(str(tmp_path / 'tiny'), count=2, size=(8, 12), bit_depth=8, channels=3, seed=5)
    datasets = {'test_ct': dict(name='ct', type='DATPRLMultiDomainDataset', phase='test',
                                datasets=[_source('ct', 'medical', 'ct_denoise', tmp_path / 'ct')]),
                'test_tiny': dict(name='tiny', type='DATPRLMultiDomainDataset', phase='test',
                                  datasets=[_source('tiny', 'natural', 'derain', tmp_path / 'tiny')])}
    torch.manual_seed(0)
    results, outputs = {}, {}
    for bits in (None, 8):
        opt = _test_opt(tmp_path, datasets, bits)
        model = build_model(opt)
        test = model.test

        def recording_test(bits=bits, model=model, test=test):  # keep what the validation scored
            test()
            outputs.setdefault(bits, []).append(model.output.detach().clone())

        model.test = recording_test
        loaders = {k: build_dataloader(build_dataset(dict(d)), dict(d), num_gpu=0) for k, d in datasets.items()}
        for loader in loaders.values():
            model.validation(loader, opt['name'], None, False)
            results[bits, loader.dataset.opt['name']] = dict(model.metric_results)
        text = open(os.path.join(opt['path']['results_root'], 'metrics.json')).read()
        record = json.loads(text, parse_constant=lambda c: pytest.fail(f'bare {c} in metrics.json'))
        assert set(record[opt['name']]['sets']['tiny']) == {'domain', 'task', 'psnr'}  # no SSIM under 11 px
        assert set(record[opt['name']]['average']) == {'psnr', 'ssim'}  # SSIM averaged over the set that has it
    # the same outputs by hand: native = uint16 values x 255/65535, 8 = BasicSR's tensor2img
    native, eight = [], []
    for i, batch in enumerate(loaders['test_ct']):
        gt16 = np.repeat((batch['gt'][0, 0].numpy() * 65535).round()[..., None], 3, axis=2).astype(np.float64)
        out16 = (outputs[None][i][0].clamp(0, 1).numpy().transpose(1, 2, 0)[..., ::-1] * 65535).round().astype(float)
        native.append(calculate_psnr(out16 * 255 / 65535, gt16 * 255 / 65535, 0))
        eight.append(calculate_psnr(tensor2img(outputs[8][i]), tensor2img(batch['gt']), 0))
    assert results[None, 'ct']['psnr'] == pytest.approx(np.mean(native), rel=1e-9)
    assert results[8, 'ct']['psnr'] == pytest.approx(np.mean(eight), rel=1e-9)
    assert results[None, 'ct']['psnr'] != pytest.approx(results[8, 'ct']['psnr'], abs=1e-3)
    assert 'ssim' not in results[None, 'tiny'] and math.isfinite(results[None, 'tiny']['psnr'])
    assert sum('[tiny] img000' in m and 'ssim skipped' in m for m in warnings_seen) == 2  # one per run


@pytest.fixture
def info_seen():
    """Every message of BasicSR's root logger."""
    handler, logger = ListHandler(), logging.getLogger('basicsr')
    handler.setLevel(logging.INFO)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_a_validation_set_of_two_domains_is_reported_per_source(tmp_path, info_seen):
    """A set holding a natural and a medical source: each source's metrics under its own domain and task (log and
    metrics.json), equal to those of the source validated alone; the set's own figure is over all its images."""
    write_pairs(str(tmp_path / 'rain'), count=2, size=(16, 16), bit_depth=8, channels=3, seed=1)
    write_pairs(str(tmp_path / 'ct'), count=2, size=(16, 16), bit_depth=16, channels=1, seed=2)
    sources = {'rain': _source('rain', 'natural', 'derain', tmp_path / 'rain'),
               'ct': _source('ct', 'medical', 'ct_denoise', tmp_path / 'ct')}
    mixed = dict(name='mixed', type='DATPRLMultiDomainDataset', phase='test', datasets=list(sources.values()))
    opt = _test_opt(tmp_path, {'test_mixed': mixed})
    torch.manual_seed(0)
    model = build_model(opt)
    model.validation(build_dataloader(build_dataset(dict(mixed)), dict(mixed), num_gpu=0), opt['name'], None, False)
    whole = dict(model.metric_results)
    record = json.loads(open(os.path.join(opt['path']['results_root'], 'metrics.json')).read())[opt['name']]
    assert list(record['sets']) == ['mixed/rain', 'mixed/ct']
    labels = [(r['domain'], r['task']) for r in record['sets'].values()]
    assert labels == [('natural', 'derain'), ('medical', 'ct_denoise')]
    assert set(record['domains']) == {'natural', 'medical'}
    assert any(m.startswith('  mixed/ct (medical, ct_denoise): psnr: ') for m in info_seen)
    alone = {}
    for name, source in sources.items():
        single = dict(name=name, type='DATPRLMultiDomainDataset', phase='test', datasets=[source])
        model.validation(build_dataloader(build_dataset(dict(single)), dict(single), num_gpu=0), 'x', None, False)
        alone[name] = model.metric_results['psnr']
        assert record['sets'][f'mixed/{name}']['psnr'] == pytest.approx(alone[name], rel=1e-12)
    assert whole['psnr'] == pytest.approx((alone['rain'] + alone['ct']) / 2)  # two images each


def test_unknown_metric_bits_is_an_error_before_the_network_is_built(tmp_path):
    with pytest.raises(ValueError, match=r"val.metric_bits: 'sixteen' is not valid; use one of \['native', '8'\]"):
        build_model(_test_opt(tmp_path, {}, 'sixteen'))


# ------------------------------------------------------------------ the runner with an SR model (input upsampled)
@MODEL_REGISTRY.register()
class NearestX2TestModel:
    """A stand-in x2 SR model for the runner: nearest-neighbour upsampling, no weights."""

    def __init__(self, opt):
        self.net_g = torch.nn.Identity()

    def get_bare_model(self, net):
        return net

    def feed_data(self, data):
        self.lq, self.gt = data['lq'], data['gt']

    def test(self):
        self.output = torch.nn.functional.interpolate(self.lq, scale_factor=2, mode='nearest')


def test_runner_upsamples_a_smaller_input_and_says_so(tmp_path):
    gt_dir, lq_dir = write_pairs(str(tmp_path / 'sr'), count=2, size=(24, 32), scale=2, seed=6)
    ckpt = tmp_path / 'none.pth'
    torch.save({'params': {}, 'network_g': {'type': 'Identity'}}, ckpt)
    option = dict(name='sr_run', model_type='NearestX2TestModel', scale=2, network_g={'type': 'Identity'},
                  datasets={'test_sr': dict(name='sr', type='PairedImageDataset', dataroot_gt=gt_dir,
                                            dataroot_lq=lq_dir, io_backend={'type': 'disk'})},
                  val={'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0}}})
    option_file = tmp_path / 'sr.yml'
    option_file.write_text(yaml.safe_dump(option))
    report = run_benchmark(str(option_file), [str(ckpt)], quiet=True, root=str(tmp_path), device='cpu')
    (row,) = report['rows']
    assert row['input_upsampled'] and row['set'] == 'sr' and row['n_images'] == 2
    assert any('bicubic-upsampled' in note and 'sr' in note for note in report['notes'])
    assert report['metrics']['ssim']['from'] == 'default'
    expected = []
    for name in sorted(os.listdir(gt_dir)):
        gt = cv2.imread(os.path.join(gt_dir, name))
        lq = cv2.imread(os.path.join(lq_dir, name)).astype(np.float32) / 255
        up = np.clip(cv2.resize(lq, (32, 24), interpolation=cv2.INTER_CUBIC), 0, 1)
        expected.append(calculate_psnr((up * 255).round().astype(np.uint8), gt, 0))
    assert row['psnr_in'] == pytest.approx(np.mean(expected), rel=1e-12)


def test_output_of_the_wrong_size_is_a_clear_error(tmp_path):
    gt_dir, lq_dir = write_pairs(str(tmp_path / 'same'), count=1, size=(16, 16), seed=7)
    ckpt = tmp_path / 'none.pth'
    torch.save({'params': {}, 'network_g': {'type': 'Identity'}}, ckpt)
    option = dict(name='wrong_scale', model_type='NearestX2TestModel', scale=1,
                  datasets={'test_same': dict(name='same', type='PairedImageDataset', dataroot_gt=gt_dir,
                                              dataroot_lq=lq_dir, io_backend={'type': 'disk'})})
    option_file = tmp_path / 'same.yml'
    option_file.write_text(yaml.safe_dump(option))
    with pytest.raises(BenchmarkError, match=r'none.pth on \[same\] img000.png: the output is \(32, 32\), the '
                                             r'ground truth \(16, 16\)'):
        run_benchmark(str(option_file), [str(ckpt)], quiet=True, root=str(tmp_path), device='cpu')


# ------------------------------------------------------------------ the command end to end
STAGES = [{'stage': 1, 'first_iter': 1, 'until_iter': 4, 'tasks': ['derain'], 'freeze': [], 'trainable_params': 1000},
          {'stage': 2, 'first_iter': 5, 'until_iter': 8, 'tasks': [], 'freeze': ['backbone'], 'trainable_params': 12}]


@pytest.fixture(scope='module')
def bench_data(tmp_path_factory):
    """A disk set (8-bit colour) and a two-source set (16-bit gray LMDB + 16-bit gray disk); checkpoints 'plain'
    (PaddedRestormer, carries network_g) and 'tuned' (the option file's DATPRLRestormer, params + params_ema)."""
    root = tmp_path_factory.mktemp('bench')
    write_pairs(str(root / 'rain'), count=3, size=(24, 32), bit_depth=8, channels=3, seed=7)
    ct_dirs = write_pairs(str(root / 'ct_png'), count=2, size=(24, 24), bit_depth=16, channels=1, seed=8)
    os.makedirs(root / 'ct')
    make_paired_lmdb(*ct_dirs, str(root / 'ct' / 'gt.lmdb'), str(root / 'ct' / 'lq.lmdb'))
    write_pairs(str(root / 'mri'), count=2, size=(20, 28), bit_depth=16, channels=1, seed=9)
    torch.manual_seed(0)
    plain = build_network(dict(RESTORMER_NET))
    torch.save({'params': plain.state_dict(), 'network_g': dict(RESTORMER_NET)}, root / 'plain.pth')
    tuned, ema = build_network(dict(DATPRL_NET)), build_network(dict(DATPRL_NET))
    with torch.no_grad():
        ema.output.weight.mul_(0.1)  # near identity (global residual): differs from 'params'
    torch.save({'params': tuned.state_dict(), 'params_ema': ema.state_dict(), 'training_stages': STAGES},
               root / 'tuned.pth')
    datasets = {'test_rain': dict(name='rain', type='DATPRLMultiDomainDataset',
                                  datasets=[_source('rain', 'natural', 'derain', root / 'rain')]),
                'test_med': dict(name='med', type='DATPRLMultiDomainDataset',
                                 datasets=[_source('ct', 'medical', 'ct_denoise', root / 'ct', 'lmdb'),
                                           _source('mri', 'medical', 'mri_denoise', root / 'mri')])}
    option = dict(name='bench_tiny', model_type='MultiModalSRv3Model', scale=1, num_gpu='auto', manual_seed=0,
                  datasets=datasets, network_g=dict(DATPRL_NET), path={'pretrain_network_g': str(root / 'tuned.pth')},
                  val={'save_img': False, 'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 1},
                                                      'ssim': {'type': 'calculate_ssim', 'crop_border': 1}}})
    (root / 'bench.yml').write_text(yaml.safe_dump(option, sort_keys=False))
    return root


def benchmark_cli(cwd, *args):
    return subprocess.Popen([sys.executable, '-m', 'datprl_arch.benchmark', *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def identity_psnr(gt_path, lq_path, crop_border):
    """PSNR of the stored LQ against the stored GT at native depth (16-bit: peak 65535)."""
    gt, lq = (cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in (gt_path, lq_path))
    scale = 255.0 / np.iinfo(gt.dtype).max
    return calculate_psnr(lq * scale, gt * scale, crop_border)


@pytest.mark.slow
def test_cli_compares_two_checkpoints_against_the_input(bench_data, tmp_path):
    root = bench_data
    process = benchmark_cli(tmp_path, '-opt', str(root / 'bench.yml'), '--ckpt', str(root / 'plain.pth'),
                            '--ckpt', str(root / 'tuned.pth'), '--quiet', '--device', 'cpu')  # CPU references
    out, err = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 0, out[-3000:] + err[-3000:]
    assert 'Traceback' not in err
    results = tmp_path / 'results' / 'bench_tiny'
    report = json.loads((results / 'report.json').read_text(), parse_constant=lambda c: pytest.fail(c))

    # provenance
    assert [c['label'] for c in report['checkpoints']] == ['plain', 'tuned']
    assert [c['training_stages'] for c in report['checkpoints']] == [[], STAGES]
    assert ('- tuned: stage 1 (iters 1-4, tasks derain): 1,000 trainable; stage 2 (iters 5-8, tasks all; frozen '
            'backbone): 12 trainable') in (results / 'report.md').read_text()
    assert [(c['network'], c['network_from']) for c in report['checkpoints']] == [
        ('PaddedRestormer', 'checkpoint'), ('DATPRLRestormer', 'option file')]
    for c in report['checkpoints']:
        assert c['sha256'] == hashlib.sha256(open(c['path'], 'rb').read()).hexdigest()
    assert set(report['versions']) >= {'datprl', 'basicsr', 'torch'} and report['versions']['basicsr'] == '1.4.2'
    assert report['metric_bits'] == 'native' and report['option_file'] == str(root / 'bench.yml')
    assert report['param_key'] == 'params_ema' and report['date'][:2] == '20'

    # rows: 3 sets (one per source) x 2 checkpoints
    rows = {(r['checkpoint'], r['set']): r for r in report['rows']}
    assert set(rows) == {(c, s) for c in ('plain', 'tuned') for s in ('rain', 'med/ct', 'med/mri')}
    fields = {'set', 'domain', 'task', 'n_images', 'psnr_in', 'psnr_out', 'gain_psnr', 'ssim_in', 'ssim_out',
              'psnr_std', 'gain_psnr_ci95', 'checkpoint'}
    assert all(fields <= set(r) for r in report['rows'])
    assert [rows['plain', s]['n_images'] for s in ('rain', 'med/ct', 'med/mri')] == [3, 2, 2]
    assert (rows['tuned', 'med/ct']['domain'], rows['tuned', 'med/ct']['task']) == ('medical', 'ct_denoise')
    assert rows['plain', 'med/mri']['bit_depth'] == 16 and rows['plain', 'rain']['bit_depth'] == 8
    for (ckpt, name), row in rows.items():  # the input's PSNR is the identity PSNR of the stored files
        folder = {'rain': root / 'rain', 'med/ct': root / 'ct_png', 'med/mri': root / 'mri'}[name]
        stems = sorted(os.listdir(folder / 'gt'))
        direct = [identity_psnr(folder / 'gt' / s, folder / 'lq' / s, 1) for s in stems]
        assert row['psnr_in'] == pytest.approx(np.mean(direct), rel=1e-9), (ckpt, name)
        assert row['gain_psnr'] == pytest.approx(row['psnr_out'] - row['psnr_in'], abs=1e-9)
        assert row['psnr_std'] is not None and row['gain_psnr_ci95'][0] <= row['gain_psnr'] <= row['gain_psnr_ci95'][1]
    # 'tuned' was loaded from params_ema (the near-identity weights): its output is close to the input
    ema = build_network(dict(DATPRL_NET))
    ema.load_state_dict(torch.load(root / 'tuned.pth', weights_only=True)['params_ema'])
    ema.eval()
    outs = []
    for stem in sorted(os.listdir(root / 'rain' / 'gt')):
        lq, gt = (cv2.imread(str(root / 'rain' / d / stem)) for d in ('lq', 'gt'))
        with torch.no_grad():
            outs.append(calculate_psnr(tensor2img(ema(tensor_of(lq))), gt, 1))
    assert rows['tuned', 'rain']['psnr_out'] == pytest.approx(np.mean(outs), rel=1e-6)

    # aggregates: domain medical = mean of its two sets; overall = mean of the three
    agg = {(a['checkpoint'], a['level'], a['group']): a for level in report['aggregates'].values() for a in level}
    med = agg['tuned', 'domain', 'medical']
    assert med['psnr_out'] == pytest.approx((rows['tuned', 'med/ct']['psnr_out'] + rows['tuned', 'med/mri']['psnr_out'])
                                            / 2)
    assert agg['plain', 'overall', 'all']['gain_psnr'] == pytest.approx(
        np.mean([rows['plain', s]['gain_psnr'] for s in ('rain', 'med/ct', 'med/mri')]))
    assert agg['plain', 'overall', 'all']['n_images'] == 7 and ('plain', 'task', 'mri_denoise') in agg

    # report.csv agrees with report.json; report.md names checkpoints and shows the numbers
    with open(results / 'report.csv', newline='') as f:
        lines = list(csv.DictReader(f))
    set_lines = {(r['checkpoint'], r['set']): r for r in lines if r['level'] == 'set'}
    assert set(set_lines) == set(rows)
    for key, row in rows.items():
        for field in ('psnr_in', 'psnr_out', 'gain_psnr', 'ssim_in', 'ssim_out', 'psnr_std'):
            assert float(set_lines[key][field]) == row[field], (key, field)
        assert float(set_lines[key]['gain_psnr_ci95_low']) == row['gain_psnr_ci95'][0]
    assert {r['level'] for r in lines} == {'set', 'task', 'domain', 'overall'}
    md = (results / 'report.md').read_text()
    for c in report['checkpoints']:
        assert c['sha256'] in md and c['path'] in md
    for row in rows.values():
        assert f"{row['psnr_out']:.2f}" in md and f"{row['gain_psnr']:+.2f}" in md
    assert 'native depth' in md and '![samples](samples.png)' in md

    # stdout: the table (sets, domains, overall) and the paths
    assert 'med/mri' in out and 'domain: medical (2 sets)' in out and 'overall (3 sets)' in out
    assert str(results / 'report.md') in out and str(results / 'samples.png') in out

    # samples.png: 3 rows (sets) x 4 cells (input | plain | tuned | ground truth)
    picture = cv2.imread(str(results / 'samples.png'), cv2.IMREAD_UNCHANGED)
    s = samples_module
    row_h = s.HEADER_H + s.LABEL_H + s.CELL + s.GAP
    assert picture.shape == (2 * s.MARGIN + 3 * row_h, 2 * s.MARGIN + 4 * s.CELL + 3 * s.GAP, 3)
    for r in range(3):
        for c in range(4):
            y = s.MARGIN + r * row_h + s.HEADER_H + s.LABEL_H + s.CELL // 2
            x = s.MARGIN + c * (s.CELL + s.GAP) + s.CELL // 2
            assert tuple(picture[y, x]) != s.BACKGROUND, (r, c)  # an image tile at every cell's centre
        strip = picture[s.MARGIN + r * row_h:s.MARGIN + r * row_h + s.HEADER_H]
        assert (strip != s.BACKGROUND).any()  # the set's header text


def test_cli_errors_are_one_message_naming_the_file(bench_data, tmp_path, monkeypatch):
    """A missing checkpoint and one that does not fit the network end the command with ``sys.exit(message)``:
    Python prints just that line and exits with status 1, no traceback."""
    monkeypatch.chdir(tmp_path)
    missing, wrong = tmp_path / 'nope.pth', tmp_path / 'wrong.pth'
    torch.save({'params': build_network(dict(RESTORMER_NET)).state_dict()}, wrong)  # no network_g: option file's
    option_file = str(bench_data / 'bench.yml')
    with pytest.raises(SystemExit) as exit_missing:
        benchmark_main(['-opt', option_file, '--ckpt', str(missing), '--quiet'])
    assert exit_missing.value.code == f'datprl-benchmark: error: checkpoint {missing} does not exist'
    assert not (tmp_path / 'results').exists()  # checked before anything is written
    with pytest.raises(SystemExit) as exit_unfit:
        benchmark_main(['-opt', option_file, '--ckpt', str(missing.parent / 'wrong.pth'), '--quiet'])
    assert re.fullmatch(rf'datprl-benchmark: error: {wrong} does not fit DATPRLRestormer: \d+ missing keys .*',
                        exit_unfit.value.code, re.S)


def test_unreadable_dataset_names_the_option_file_and_set(bench_data, tmp_path):
    option = yaml.safe_load((bench_data / 'bench.yml').read_text())
    option['datasets']['test_rain']['datasets'][0]['dataroot_gt'] = str(tmp_path / 'gone')
    option_file = tmp_path / 'broken.yml'
    option_file.write_text(yaml.safe_dump(option, sort_keys=False))
    expected = rf'(?s){option_file}: datasets.test_rain cannot be read: .*{tmp_path / "gone"} does not exist'
    with pytest.raises(BenchmarkError, match=expected):
        run_benchmark(str(option_file), [], quiet=True, root=str(tmp_path), device='cpu')


def test_amp_runs_the_test_path_in_bf16_or_is_refused_with_the_reason(bench_data, tmp_path, monkeypatch):
    """``--amp bf16`` on a CPU with native bf16 scores within bf16 rounding of float32 and is recorded; fp16 on the
    CPU and bf16 on a CPU without it end with the reason, before anything is written."""
    monkeypatch.chdir(tmp_path)
    option_file, ckpt = str(bench_data / 'bench.yml'), str(bench_data / 'tuned.pth')
    with pytest.raises(SystemExit) as refused:
        benchmark_main(['-opt', option_file, '--ckpt', ckpt, '--device', 'cpu', '--amp', 'fp16', '--quiet'])
    assert refused.value.code == ('datprl-benchmark: error: --amp fp16: fp16 autocast has no fast path on the CPU; '
                                  'use bf16 (on CPUs with native bf16) or float32')
    monkeypatch.setattr(precision, 'cpu_bf16_flags', lambda: ())
    with pytest.raises(SystemExit, match='this CPU has no native bf16'):
        benchmark_main(['-opt', option_file, '--ckpt', ckpt, '--device', 'cpu', '--amp', 'bf16', '--quiet'])
    assert not (tmp_path / 'results').exists()
    monkeypatch.setattr(precision, 'cpu_bf16_flags', lambda: ('avx512_bf16',))
    reports = {amp: run_benchmark(option_file, [ckpt], name=amp, device='cpu', quiet=True, amp=amp)
               for amp in (None, 'bf16')}
    assert reports['bf16']['amp'] == 'bf16' and reports[None]['amp'] == 'none'
    assert 'autocast bf16' in (tmp_path / 'results' / 'bf16' / 'report.md').read_text()
    for fp32, bf16 in zip(reports[None]['rows'], reports['bf16']['rows']):
        assert bf16['psnr_in'] == fp32['psnr_in']  # the input is scored as stored
        assert bf16['psnr_out'] == pytest.approx(fp32['psnr_out'], abs=BF16_PSNR_TOLERANCE_DB)


EXPLICIT = dict(type='PromptedBackbone', backbone=dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=8,
                                                       num_block=2, upscale=1),
                taps={}, inject_after=['body.1'], probe_size=16,
                prompt={'type': 'ExplicitPrompt', 'tasks': ['derain', 'ct_denoise', 'mri_denoise'], 'width': 8})


def test_task_prompts_restore_each_set_under_its_labels_prompt(bench_data, tmp_path):
    torch.manual_seed(0)
    net = build_network(dict(EXPLICIT))
    with torch.no_grad():
        for param in net.fusions.parameters():
            param.add_(0.3 * torch.randn_like(param))
    torch.save({'params': net.state_dict(), 'network_g': dict(EXPLICIT)}, tmp_path / 'explicit.pth')
    with torch.no_grad():  # every row the derain prompt: whatever the classifier picks, a rain image gets it
        net.prompt_mode.task_prompts.weight.copy_(net.prompt_mode.task_prompts.weight[0].expand(3, -1))
    torch.save({'params': net.state_dict(), 'network_g': dict(EXPLICIT)}, tmp_path / 'all_derain.pth')
    option = str(bench_data / 'bench.yml')
    labelled = run_benchmark(option, [str(tmp_path / 'explicit.pth')], name='labelled', quiet=True,
                             root=str(tmp_path), task_prompts=True)
    forced = run_benchmark(option, [str(tmp_path / 'all_derain.pth')], name='forced', quiet=True, root=str(tmp_path))
    rain = lambda report: next(r for r in report['rows'] if r['set'] == 'rain')  # noqa: E731
    assert labelled['task_prompts'] and not forced['task_prompts']
    assert rain(labelled)['psnr_out'] == rain(forced)['psnr_out']
    report_md = (tmp_path / 'results' / 'labelled' / 'report.md').read_text()
    assert "under its task's own prompt (--task-prompts)" in report_md
    with pytest.raises(BenchmarkError, match=r"--task-prompts, .*tuned.pth: task 'derain': DATPRLRestormer with dual "
                                             'prompt pools has no prompt per task'):
        run_benchmark(option, [str(bench_data / 'tuned.pth')], name='x', quiet=True, root=str(tmp_path),
                      task_prompts=True)


def test_a_rerun_archives_the_earlier_results_never_replacing_them(bench_data, tmp_path, monkeypatch, capsys):
    """As BasicSR's train/test: an existing results/<name>/ is moved to <name>_archived_<time> first, so a failing
    rerun leaves the earlier report with its log."""
    monkeypatch.chdir(tmp_path)
    option, ckpt = str(bench_data / 'bench.yml'), str(bench_data / 'plain.pth')
    results, reports = tmp_path / 'results' / 'bench_tiny', ('report.json', 'report.md', 'report.csv', 'samples.png')
    assert run_benchmark(option, [ckpt], quiet=True, device='cpu')['archived'] is None
    first = {n: (results / n).read_bytes() for n in reports}
    benchmark_main(['-opt', option, '--ckpt', ckpt, '--quiet', '--device', 'cpu'])

    def archives():
        return sorted(p for p in (tmp_path / 'results').iterdir() if p.name != 'bench_tiny')

    assert [re.fullmatch(r'bench_tiny_archived_\d{8}_\d{6}', p.name) is not None for p in archives()] == [True]
    assert {n: (archives()[0] / n).read_bytes() for n in reports} == first
    assert f'Earlier results of this name: moved to {archives()[0]}' in capsys.readouterr().out
    assert set(reports) <= set(os.listdir(results))  # the rerun wrote a whole report of its own
    second = {n: (results / n).read_bytes() for n in reports}

    broken = yaml.safe_load((bench_data / 'bench.yml').read_text())
    broken['datasets'] = {}
    (tmp_path / 'nosets.yml').write_text(yaml.safe_dump(broken))
    with pytest.raises(SystemExit) as failed:
        benchmark_main(['-opt', str(tmp_path / 'nosets.yml'), '--ckpt', ckpt, '--quiet', '--device', 'cpu'])
    assert failed.value.code.startswith('datprl-benchmark: error: ') and 'no datasets' in failed.value.code
    assert len(archives()) == 2 and {n: (archives()[1] / n).read_bytes() for n in reports} == second
    assert not set(reports) & set(os.listdir(results))  # the failed run's folder holds its log only


def busy(src, dst):
    """``os.rename`` of a folder that is itself a read-only mount (``unshare -m``, ``mount --bind -o ro``)."""
    raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), src, dst)


def test_a_results_folder_that_cannot_be_written_is_named_without_a_traceback(bench_data, tmp_path, monkeypatch,
                                                                              capsys):
    """results/ on a read-only mount (tests run as root: its answer is simulated), and results/<name>/ itself a
    read-only mount (it cannot be moved aside): one message naming the folder, nothing written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'results' / 'bench_tiny').mkdir(parents=True)
    args = ['-opt', str(bench_data / 'bench.yml'), '--ckpt', str(bench_data / 'plain.pth'), '--quiet']
    results = tmp_path / 'results'
    monkeypatch.setattr(folders, 'unwritable_reason',
                        lambda path: 'on a read-only file system' if str(path) == str(results) else None)
    with pytest.raises(SystemExit) as exit_info:
        benchmark_main(args)
    assert exit_info.value.code == (
        f'datprl-benchmark: error: the results folder {results}/bench_tiny cannot be written: {results} is on a '
        f'read-only file system. Run from a writable folder (outputs go under the current directory), or make '
        f'{results} writable.')
    monkeypatch.setattr(folders, 'unwritable_reason', lambda path: None)
    monkeypatch.setattr(os, 'rename', busy)
    with pytest.raises(SystemExit) as exit_info:
        benchmark_main(args)
    assert re.fullmatch(rf'datprl-benchmark: error: the results folder {results}/bench_tiny cannot be moved aside to '
                        rf'{results}/bench_tiny_archived_\d{{8}}_\d{{6}} \(Device or resource busy\)\. A mount point '
                        'or a folder in use cannot be renamed: choose another name, or move it away.',
                        exit_info.value.code)
    assert os.listdir(results) == ['bench_tiny'] and os.listdir(results / 'bench_tiny') == []
    assert 'Traceback' not in capsys.readouterr().err


def test_max_pixels_reaches_the_model_test_and_is_checked(bench_data, tmp_path, monkeypatch):
    """--max-pixels becomes val.max_pixels, which DATPRLModel.test tiles by (tiling itself: test_cuda_hazards)."""
    from datprl_arch.models import datprl_model
    seen, real = [], datprl_model.bounded_forward
    monkeypatch.setattr(datprl_model, 'bounded_forward',
                        lambda net, x, max_pixels: seen.append(max_pixels) or real(net, x, max_pixels))
    option, ckpt = str(bench_data / 'bench.yml'), str(bench_data / 'plain.pth')
    run_benchmark(option, [ckpt], name='bounded', quiet=True, root=str(tmp_path), device='cpu', max_pixels=4096)
    assert seen and set(seen) == {4096}
    with pytest.raises(BenchmarkError, match=r'--max-pixels 100: expected at least 1600'):
        run_benchmark(option, [ckpt], name='small', quiet=True, root=str(tmp_path), device='cpu', max_pixels=100)
