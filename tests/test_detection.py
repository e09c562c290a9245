"""Detection heads, calibration, ``datprl-restore --explain`` / ``--guard`` and the benchmark's detection report: a
toy network whose pool queries are linear in simple image statistics (separable prompts) on toy sets of three
domains (tints) and three tasks (clean, noise, stripes)."""
import csv
import hashlib
import json
import logging
import math
import os

import cv2
import numpy as np
import pytest
import torch
import yaml
from torch import nn

from basicsr.archs import build_network
from basicsr.utils.registry import ARCH_REGISTRY
from datprl_arch.archs.prompt import PoolSpec, PromptConfig, PromptSystem
from datprl_arch.evaluation.aggregate import CLEAN_TASK
from datprl_arch.evaluation.detection import DetectionTally, expected_calibration_error
from datprl_arch.evaluation.runner import run_benchmark
from datprl_arch.inference.calibration import UNSURE_CEILING, calibrate, fit_temperature, fold_indices
from datprl_arch.inference.detection import (HEAD_KEY, DetectionError, DetectionHead, GuardThresholds, change_psnr,
                                             read_head, save_with_head)
from datprl_arch.inference.guard import (BLENDED, GUARD_OFF, KEPT_INPUT, REPORT_CSV, REPORT_FIELDS, REPORT_JSON,
                                         RESTORED, Explainer)
from datprl_arch.restore import main as restore_main
from datprl_arch.tools.calibrate import default_out
from datprl_arch.tools.calibrate import main as calibrate_main
from datprl_arch.utils.checkpoint import METADATA_KEY, NETWORK_KEY, read_checkpoint, save_safetensors
from datprl_arch.utils.registry import register

from networks import TINY

TINTS = {'natural': (0.3, 0.5, 0.9), 'medical': (0.35, 0.35, 0.35), 'remote_sensing': (0.8, 0.6, 0.2)}  # BGR
TASKS = ('clean', 'denoise', 'derain')
TOY = {'type': 'SeparableToy'}
SIDE = 24
NOISE_STD = 0.25
STRIPE_PERIOD = 3


@register(ARCH_REGISTRY)
class SeparableToy(PromptSystem):
    """A prompted toy network whose domain query is linear in the image's mean colour and whose task query is
    linear in its mean horizontal and vertical gradient magnitudes: the prompts separate the toy sets' labels."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.build_prompt_system({'domain': 4, 'task': 4}, PromptConfig(PoolSpec(4, dim, 2), PoolSpec(3, dim, 2), 1,
                                                                        'concat'))
        self.domain_mapper = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, dim))
        self.degradation_mapper = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, dim))

    def forward(self, x):
        dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(1, keepdim=True)[..., :-1, :]
        dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(1, keepdim=True)[..., :, :-1]
        prompt = self.block_prompt({'domain': x, 'task': torch.cat([dx, dy], 1)})
        return x + 0.1 * torch.tanh(self.conv(x)) * prompt.mean(1)[:, None, None, None]


def toy_image(domain, task, rng, side=SIDE):
    """GT and LQ float ``(H, W, 3)`` BGR in [0, 1]: a smooth tinted image and its noisy / striped / clean copy."""
    coarse = rng.random((3, 3)).astype(np.float32)
    base = cv2.resize(coarse, (side, side), interpolation=cv2.INTER_LINEAR)[..., None]
    gt = np.clip(0.5 * base + 0.7 * np.array(TINTS[domain]), 0, 1)
    lq = gt.copy()
    if task == 'denoise':
        lq = np.clip(gt + rng.normal(0, NOISE_STD, gt.shape), 0, 1)
    elif task == 'derain':
        lq[:, ::STRIPE_PERIOD] = 1.0
    return gt, lq


def to8(img):
    return (img * 255).round().astype(np.uint8)


def write_split(root, split, count, seed):
    """Toy sets of every domain and task under ``root/split``; returns the option file."""
    rng = np.random.default_rng(seed)
    datasets = {}
    for domain in TINTS:
        for task in TASKS:
            name = f'{domain}_{task}'
            folder = root / split / name
            for sub in ('gt', 'lq'):
                (folder / sub).mkdir(parents=True)
            for i in range(count):
                gt, lq = toy_image(domain, task, rng)
                cv2.imwrite(str(folder / 'gt' / f'{i:02d}.png'), to8(gt))
                cv2.imwrite(str(folder / 'lq' / f'{i:02d}.png'), to8(lq))
            datasets[f'{split}_{name}'] = dict(name=name, type='DATPRLMultiDomainDataset', datasets=[dict(
                name=name, domain=domain, task=task, dataroot_gt=str(folder / 'gt'), dataroot_lq=str(folder / 'lq'),
                io_backend={'type': 'disk'})])
    option = dict(name=f'toy_{split}', model_type='MultiModalSRv3Model', scale=1, num_gpu=0, manual_seed=0,
                  datasets=datasets, network_g=dict(TOY),
                  val={'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0},
                                   'ssim': {'type': 'calculate_ssim', 'crop_border': 0}}})
    path = root / f'{split}.yml'
    path.write_text(yaml.safe_dump(option, sort_keys=False))
    return str(path)


def sha(path):
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """Validation and test option files, the toy checkpoint and its calibrated copy (and what calibrate returned)."""
    root = tmp_path_factory.mktemp('toy')
    val, test = write_split(root, 'val', 6, 0), write_split(root, 'test', 3, 1)
    torch.manual_seed(0)
    ckpt = str(root / 'toy.pth')
    torch.save({'params': build_network(dict(TOY)).state_dict(), 'network_g': dict(TOY)}, ckpt)
    before = sha(ckpt)
    result = calibrate(ckpt, val, str(root / 'toy_head.pth'), device='cpu', tests=(test,))
    assert sha(ckpt) == before  # the input checkpoint is never modified
    return {'root': root, 'val': val, 'test': test, 'ckpt': ckpt, 'calibrated': str(root / 'toy_head.pth'),
            'result': result}


# ------------------------------------------------------------------------------------------------ fitting
def test_calibration_on_separable_prompts_reaches_the_known_labels(toy):
    result = toy['result']
    for kind in ('domain', 'task'):
        assert result['validation']['overall'][kind]['accuracy'] == 1.0  # out of fold
        test = result['tests'][toy['test']]
        assert test['overall'][kind]['accuracy'] == 1.0 and test['overall'][kind]['images'] == 27
        assert test['overall'][kind]['ece'] < 0.1
        assert all(figures[kind]['accuracy'] == 1.0 for figures in test['sets'].values())
    head = result['head']
    assert head.classes('domain') == list(TINTS) and head.classes('task') == list(TASKS)
    assert head.kind == 'pools' and head.mean.numel() == 8 + 4 + 8 + 3  # queries and similarities of both pools
    assert 0 < head.guard.min_confidence <= UNSURE_CEILING
    assert set(head.guard.change_db) == set(TASKS)
    assert all(low < high for low, high in head.guard.change_db.values())
    assert head.fit['images'] == 54 and head.fit['option_file'] == os.path.abspath(toy['val'])


def test_fit_temperature_recovers_a_known_temperature():
    torch.manual_seed(0)
    logits = 3 * torch.randn(4000, 4, dtype=torch.float64)
    labels = torch.multinomial((logits / 2.5).softmax(-1), 1)[:, 0]  # drawn at temperature 2.5
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.1)


def test_folds_deal_every_set_evenly():
    folds = fold_indices(['a'] * 7 + ['b'] * 3, folds=5)
    assert folds.tolist() == [0, 1, 2, 3, 4, 0, 1, 0, 1, 2]


def test_expected_calibration_error_by_hand():
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 0, 1])
    # bin 0.9: accuracy 1/2 vs 0.9 (2 images); bin 0.6: 1 vs 0.6; bin 0.7: 1 vs 0.7
    assert expected_calibration_error(probabilities, labels) == pytest.approx((2 * 0.4 + 0.4 + 0.3) / 4)
    unknown = np.array([-1, -1, -1, -1])  # labels the head does not know: always wrong, ECE = mean confidence
    assert expected_calibration_error(probabilities, unknown) == pytest.approx(0.775)


def test_tally_counts_unknown_labels_as_wrong_and_builds_the_confusion():
    tally = DetectionTally({'task': ['a', 'b']})
    tally.add('s1', {'task': 'a'}, {'task': [0.8, 0.2]})
    tally.add('s1', {'task': 'b'}, {'task': [0.8, 0.2]})
    tally.add('s2', {'task': 'c'}, {'task': [0.1, 0.9]})
    summary = tally.summary()
    assert summary['sets']['s1']['task']['accuracy'] == 0.5 and summary['sets']['s2']['task']['accuracy'] == 0
    confusion = summary['overall']['task']['confusion']
    assert confusion['rows'] == ['a', 'b', 'c'] and confusion['counts'] == [[1, 0], [1, 0], [0, 1]]
    assert summary['unknown']['task'] == ['c']


@pytest.mark.parametrize('config', [
    TINY, {k: v for k, v in dict(TINY, type='DATPRLRestormerTaskPool').items() if not k.startswith('domain_')},
    dict(type='PromptedBackbone', backbone=dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=8, num_block=2,
                                                upscale=1),
         taps={'domain': 'conv_first', 'task': 'body.0'}, inject_after=['body.1'], probe_size=16,
         prompt={'task_pool': {'size': 4, 'dim': 8, 'top_k': 2}, 'domain_pool': {'size': 3, 'dim': 8, 'top_k': 2}}),
], ids=['dual_pools', 'task_pool', 'prompted_backbone'])
def test_every_pool_network_gets_a_head(toy, config):
    torch.manual_seed(0)
    net = build_network(dict(config))
    pools = 2 if config['type'] != 'DATPRLRestormerTaskPool' else 1
    ckpt = toy['root'] / f"{config['type']}.pth"
    torch.save({'params': net.state_dict(), 'network_g': dict(config)}, ckpt)
    result = calibrate(str(ckpt), toy['val'], str(ckpt).replace('.pth', '_head.pth'), device='cpu')
    head = result['head']
    widths = [p.prompt_keys.shape for p in net.prompt_pools().values()]
    assert len(widths) == pools and head.mean.numel() == sum(d + p for p, d in widths)
    assert head.classes('domain') == list(TINTS) and head.classes('task') == list(TASKS)
    assert result['validation']['overall']['domain']['accuracy'] > 0.5  # a random network still tells tints apart


EXPLICIT = dict(type='PromptedBackbone', backbone=dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=8,
                                                       num_block=2, upscale=1),
                taps={}, inject_after=['body.1'], probe_size=16,
                prompt={'type': 'ExplicitPrompt', 'tasks': list(TASKS), 'width': 8})


def test_label_modes_use_their_own_classifier(toy):
    torch.manual_seed(0)
    net = build_network(dict(EXPLICIT)).eval()
    ckpt = toy['root'] / 'explicit.pth'
    torch.save({'params': net.state_dict(), 'network_g': dict(EXPLICIT)}, ckpt)
    head = calibrate(str(ckpt), toy['val'], str(toy['root'] / 'explicit_head.pth'), device='cpu')['head']
    assert head.kind == 'classifier' and head.heads['domain'] is None and head.classes('task') == list(TASKS)
    image = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        net.compute_prompt(image)
        logits = net.prompt_state.task_logits
    expected = (logits.double() / head.heads['task'].temperature).softmax(-1)
    assert torch.allclose(head.predict(logits)['task'], expected)


def test_a_network_without_prompts_is_refused(toy):
    plain = dict(type='Restormer', dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1)
    torch.save({'params': build_network(dict(plain)).state_dict(), 'network_g': plain}, toy['root'] / 'plain.pth')
    with pytest.raises(DetectionError, match='has no prompt system'):
        calibrate(str(toy['root'] / 'plain.pth'), toy['val'], str(toy['root'] / 'plain_head.pth'), device='cpu')


# ------------------------------------------------------------------------------------------------ storage
def assert_same_head(a: DetectionHead, b: DetectionHead):
    assert a.to_dict() == b.to_dict()
    features = torch.randn(5, a.mean.numel())
    for kind, p in a.predict(features).items():
        assert torch.equal(p, b.predict(features)[kind])


def test_the_head_survives_a_pth_round_trip(toy):
    stored, original = read_checkpoint(toy['calibrated']), read_checkpoint(toy['ckpt'])
    assert set(stored) == set(original) | {HEAD_KEY}
    assert all(torch.equal(stored['params'][k], v) for k, v in original['params'].items())
    assert_same_head(read_head(toy['calibrated']), toy['result']['head'])
    assert read_head(toy['ckpt']) is None


def test_the_head_survives_a_safetensors_round_trip(toy, tmp_path):
    net = build_network(dict(TOY))
    src, dst = str(tmp_path / 'toy.safetensors'), str(tmp_path / 'toy_head.safetensors')
    save_safetensors(net.state_dict(), src, TOY, {'provenance': 'a test'})
    before = sha(src)
    head = toy['result']['head']
    save_with_head(src, dst, head, TOY)
    assert sha(src) == before
    stored = read_checkpoint(dst)
    assert stored[NETWORK_KEY] == TOY and stored[METADATA_KEY]['provenance'] == 'a test'
    assert all(torch.equal(stored['params_ema'][k], v) for k, v in net.state_dict().items())
    assert_same_head(read_head(dst), head)
    with pytest.raises(DetectionError, match='is the input checkpoint'):
        save_with_head(src, src, head, TOY)
    with pytest.raises(DetectionError, match='keep the format'):
        save_with_head(src, str(tmp_path / 'toy.pth'), head, TOY)


def test_a_damaged_head_is_named(toy, tmp_path):
    stored = dict(read_checkpoint(toy['calibrated']))
    stored[HEAD_KEY] = dict(stored[HEAD_KEY], version=99)
    torch.save(stored, tmp_path / 'bad.pth')
    with pytest.raises(DetectionError, match=r'bad.pth: detection head version 99'):
        read_head(str(tmp_path / 'bad.pth'))
    del stored[HEAD_KEY]['version'], stored[HEAD_KEY]['guard']
    stored[HEAD_KEY]['version'] = 1
    torch.save(stored, tmp_path / 'bad.pth')
    with pytest.raises(DetectionError, match="lacks or mangles 'guard'"):
        read_head(str(tmp_path / 'bad.pth'))


# ------------------------------------------------------------------------------------------------ restore
def restore(*args):
    return restore_main(['--quiet', '--device', 'cpu', *map(str, args)])


def report_rows(folder):
    with open(folder / REPORT_CSV, newline='') as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, {os.path.basename(r['file']): r for r in reader}


def unit(img):
    return img.astype(np.float64) / np.iinfo(img.dtype).max


def psnr(a, b):
    return 10 * math.log10(1 / np.mean((unit(a) - unit(b)) ** 2))


def test_explain_report_columns_and_values_for_a_folder(toy, tmp_path):
    src, out = tmp_path / 'in', tmp_path / 'out'
    src.mkdir()
    rng = np.random.default_rng(5)
    labels = {}
    for domain, task in [('natural', 'denoise'), ('medical', 'derain'), ('remote_sensing', 'clean')]:
        name = f'{domain}_{task}.png'
        cv2.imwrite(str(src / name), to8(toy_image(domain, task, rng)[1]))
        labels[name] = (domain, task)
    assert restore('--ckpt', toy['calibrated'], '--explain', src, out) == 0
    columns, rows = report_rows(out)
    assert tuple(columns) == REPORT_FIELDS and set(rows) == set(labels)
    for name, row in rows.items():
        assert (row['domain'], row['task']) == labels[name] and row['output'] == str(out / name)
        assert 1 / 3 < float(row['domain_probability']) <= 1 and 1 / 3 < float(row['task_probability']) <= 1
        assert (row['tiles'], row['tile_side'], row['guard'], row['guard_reason']) == ('1', '', GUARD_OFF, '')
        assert float(row['seconds']) > 0 and float(row['kept_fraction']) == 1
        written, original = cv2.imread(str(out / name)), cv2.imread(str(src / name))
        assert float(row['change_psnr_db']) == pytest.approx(psnr(written, original), abs=0.2)  # 8-bit rounding
        assert row['output_change_psnr_db'] == row['change_psnr_db']
    with open(out / REPORT_JSON) as f:
        report = json.load(f)
    assert report['detection_head'] is True and report['guard'] is False and report['columns'] == list(REPORT_FIELDS)
    assert report['thresholds'] == toy['result']['head'].guard.to_dict()
    for image in report['images']:
        assert list(image['probabilities']['task']) == list(TASKS)
        assert sum(image['probabilities']['domain'].values()) == pytest.approx(1)


def test_explain_on_16bit_and_gray_images(toy, tmp_path):
    src, out = tmp_path / 'in', tmp_path / 'out'
    src.mkdir()
    lq = toy_image('medical', 'denoise', np.random.default_rng(6))[1]
    images = {'gray8.png': to8(lq)[..., 0], 'gray16.png': (lq[..., 0] * 65535).round().astype(np.uint16),
              'colour16.tif': (lq * 65535).round().astype(np.uint16)}
    for name, img in images.items():
        cv2.imwrite(str(src / name), img)
    assert restore('--ckpt', toy['calibrated'], '--explain', src, out) == 0
    _, rows = report_rows(out)
    assert set(rows) == set(images)
    for name, img in images.items():
        written = cv2.imread(str(out / name), cv2.IMREAD_UNCHANGED)
        assert written.dtype == img.dtype and written.shape == img.shape
        assert rows[name]['task'] == 'denoise' and math.isfinite(float(rows[name]['change_psnr_db']))
        assert float(rows[name]['change_psnr_db']) == pytest.approx(psnr(written, img), abs=0.2)


def always_clean(head: DetectionHead) -> DetectionHead:
    """A copy of ``head`` whose task head judges every image clean."""
    copy = DetectionHead.from_dict(head.to_dict())
    task = copy.heads['task']
    task.weight.zero_()
    task.bias.copy_(torch.tensor([10.0 if c == CLEAN_TASK else 0.0 for c in task.classes]))
    return copy


def test_the_guard_returns_the_input_exactly_for_an_image_judged_clean(toy, tmp_path):
    ckpt = str(tmp_path / 'clean.pth')
    save_with_head(toy['ckpt'], ckpt, always_clean(toy['result']['head']), TOY)
    src = tmp_path / 'in'
    src.mkdir()
    lq = toy_image('natural', 'denoise', np.random.default_rng(7))[1]
    rgba = np.concatenate([to8(lq), np.full(lq.shape[:2] + (1,), 200, np.uint8)], axis=2)
    images = {'colour.png': to8(lq), 'gray16.png': (lq[..., 1] * 65535).round().astype(np.uint16), 'alpha.png': rgba}
    for name, img in images.items():
        cv2.imwrite(str(src / name), img)
    assert restore('--ckpt', ckpt, '--guard', src, tmp_path / 'guarded') == 0  # --guard writes the report too
    _, rows = report_rows(tmp_path / 'guarded')
    for name, img in images.items():
        assert np.array_equal(cv2.imread(str(tmp_path / 'guarded' / name), cv2.IMREAD_UNCHANGED), img)
        row = rows[name]
        assert (row['task'], row['guard'], row['kept_fraction']) == (CLEAN_TASK, KEPT_INPUT, '0.0000')
        assert row['guard_reason'].startswith('judged clean') and row['output_change_psnr_db'] == 'inf'
    assert restore('--ckpt', ckpt, '--no-guard', '--explain', src, tmp_path / 'unguarded') == 0
    restored = cv2.imread(str(tmp_path / 'unguarded' / 'colour.png'), cv2.IMREAD_UNCHANGED)
    assert not np.array_equal(restored, images['colour.png'])  # the network itself changes the image
    assert report_rows(tmp_path / 'unguarded')[1]['colour.png']['guard'] == GUARD_OFF


GUARD = GuardThresholds(0.6, {'denoise': [20.0, 40.0]})


@pytest.mark.parametrize('task, probability, change, guard, kept', [
    ('clean', 0.9, 30.0, KEPT_INPUT, 0.0),
    ('denoise', 0.5, 30.0, KEPT_INPUT, 0.0),  # unsure
    ('denoise', 0.9, 14.0, BLENDED, 10 ** (-6 / 20)),  # 6 dB more change than the range allows
    ('denoise', 0.9, 30.0, RESTORED, 1.0),
    ('denoise', 0.9, 45.0, RESTORED, 1.0),  # a small change is reported, not acted on
    ('derain', 0.9, 5.0, RESTORED, 1.0),  # no range measured for the task: no change check
])
def test_guard_decisions(toy, task, probability, change, guard, kept):
    head = DetectionHead.from_dict(toy['result']['head'].to_dict())
    head.guard = GUARD
    got = Explainer(head, guard=True).decide({'task': task, 'task_probability': probability}, change)
    assert got[0] == guard and got[2] == pytest.approx(kept)
    assert Explainer(head, guard=False).decide({'task': task, 'task_probability': probability}, change)[0] == GUARD_OFF


def test_a_blend_lands_on_the_edge_of_the_range(toy, monkeypatch):
    head = DetectionHead.from_dict(toy['result']['head'].to_dict())
    head.guard = GUARD
    explainer = Explainer(head, guard=True)
    monkeypatch.setattr(explainer, 'detect', lambda restorer, image: {'task': 'denoise', 'task_probability': 0.9})
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    output = (image + 0.3 * torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert change_psnr(output, image) < GUARD.change_db['denoise'][0]
    blended, kept_input, record = explainer(None, image, output)
    assert not kept_input and record['guard'] == BLENDED
    assert change_psnr(blended, image) == pytest.approx(GUARD.change_db['denoise'][0], abs=1e-6)
    assert record['output_change_psnr_db'] == pytest.approx(GUARD.change_db['denoise'][0], abs=1e-6)


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_a_checkpoint_without_a_head(toy, tmp_path, capsys):
    cv2.imwrite(str(tmp_path / 'a.png'), to8(toy_image('natural', 'clean', np.random.default_rng(8))[1]))
    with pytest.raises(SystemExit) as exit_info:
        restore('--ckpt', toy['ckpt'], '--guard', tmp_path / 'a.png', f"{tmp_path / 'out'}/")
    message = str(exit_info.value)
    assert f"--guard needs a detection head, and {toy['ckpt']} has none" in message
    assert 'python -m datprl_arch.tools.calibrate' in message and not (tmp_path / 'out').exists()
    seen, logger = Warnings(), logging.getLogger('basicsr')
    logger.addHandler(seen)
    try:
        assert restore('--ckpt', toy['ckpt'], '--explain', tmp_path / 'a.png', f"{tmp_path / 'out'}/") == 0
    finally:
        logger.removeHandler(seen)
    assert any('has no detection head: the report gives the change' in m for m in seen.messages)
    row = report_rows(tmp_path / 'out')[1]['a.png']
    assert (row['domain'], row['task'], row['guard'], row['guard_reason']) == ('', '', GUARD_OFF, 'no detection head')
    assert math.isfinite(float(row['change_psnr_db']))


def test_a_head_of_another_network_is_refused_before_restoring(toy, tmp_path):
    torch.manual_seed(0)
    ckpt = str(tmp_path / 'tiny.pth')
    torch.save({'params': build_network(dict(TINY)).state_dict(), 'network_g': dict(TINY)}, ckpt)
    save_with_head(ckpt, str(tmp_path / 'tiny_head.pth'), toy['result']['head'], TINY)  # the toy's head
    cv2.imwrite(str(tmp_path / 'a.png'), to8(toy_image('natural', 'clean', np.random.default_rng(9))[1]))
    with pytest.raises(SystemExit, match='the detection head was fitted on 23'):
        restore('--ckpt', tmp_path / 'tiny_head.pth', '--explain', tmp_path / 'a.png', f"{tmp_path / 'out'}/")
    assert not (tmp_path / 'out').exists()


# ------------------------------------------------------------------------------------------------ benchmark
def test_the_benchmark_reports_detection_of_checkpoints_with_a_head(toy, tmp_path):
    report = run_benchmark(toy['test'], [toy['calibrated'], toy['ckpt']], name='detection', device='cpu',
                           quiet=True, root=str(tmp_path))
    detection = report['detection']
    assert list(detection) == ['toy_head']  # the checkpoint without a head has no detection
    summary = detection['toy_head']
    assert len(summary['sets']) == 9 and summary['classes'] == {'domain': list(TINTS), 'task': list(TASKS)}
    for kind in ('domain', 'task'):
        assert summary['overall'][kind]['accuracy'] == 1.0 and summary['overall'][kind]['images'] == 27
        assert 0 <= summary['overall'][kind]['ece'] < 0.1
        counts = np.array(summary['overall'][kind]['confusion']['counts'])
        assert counts.sum() == 27 and (np.diag(counts) == 9).all()
    # the benchmark's detections are those tools.calibrate measured on the same sets
    assert summary['sets'] == toy['result']['tests'][toy['test']]['sets']
    results = tmp_path / 'results' / 'detection'
    assert report['files']['confusion_png'] == str(results / 'confusion.png')
    assert cv2.imread(report['files']['confusion_png']) is not None
    markdown = (results / 'report.md').read_text()
    assert '## Detection' in markdown and '### toy_head' in markdown and '![confusion](confusion.png)' in markdown
    assert '| natural_denoise | 3 | 100.0% |' in markdown
    with open(results / 'report.json') as f:
        assert json.load(f)['detection']['toy_head']['overall']['task']['accuracy'] == 1.0


def test_a_tiled_image_is_detected_from_the_whole_image(toy, tmp_path):
    cv2.imwrite(str(tmp_path / 'a.png'), to8(toy_image('remote_sensing', 'derain', np.random.default_rng(10))[1]))
    assert restore('--ckpt', toy['calibrated'], '--explain', tmp_path / 'a.png', f"{tmp_path / 'whole'}/") == 0
    assert restore('--ckpt', toy['calibrated'], '--explain', '--tile', 16, '--tile-overlap', 4, tmp_path / 'a.png',
                   f"{tmp_path / 'tiled'}/") == 0
    whole, tiled = report_rows(tmp_path / 'whole')[1]['a.png'], report_rows(tmp_path / 'tiled')[1]['a.png']
    assert (whole['tiles'], whole['tile_side'], tiled['tiles'], tiled['tile_side']) == ('1', '', '4', '16')
    for column in ('domain', 'domain_probability', 'task', 'task_probability'):
        assert whole[column] == tiled[column]
    assert (whole['domain'], whole['task']) == ('remote_sensing', 'derain')


def test_the_calibrate_command_prints_its_figures_and_never_replaces_a_file(toy, tmp_path, capsys):
    out, figures = tmp_path / 'head.pth', tmp_path / 'figures.json'
    args = ['--ckpt', toy['ckpt'], '-opt', toy['val'], '--out', str(out), '--test', toy['test'], '--device', 'cpu',
            '--json', str(figures), '--quiet']
    assert calibrate_main(args) == 0
    printed = capsys.readouterr().out
    assert f'Detection head written to {out}' in printed and 'validation (out of fold): domain 100.0%' in printed
    assert f"{toy['test']}: domain 100.0%" in printed and 'guard: task confidence below' in printed
    with open(figures) as f:
        stored = json.load(f)
    assert stored['tests'][toy['test']]['overall']['task']['accuracy'] == 1.0
    assert stored['head'] == read_head(str(out)).to_dict()
    with pytest.raises(SystemExit, match='head.pth exists; pass --overwrite'):
        calibrate_main(args)
    assert default_out('runs/net_g_400.pth') == 'runs/net_g_400_calibrated.pth'
    assert default_out('release') == 'md_mini_release_calibrated.safetensors'  # never inside the package


def test_a_bare_state_dict_gets_its_network_and_head_beside_it(toy, tmp_path):
    torch.manual_seed(0)
    net = build_network(dict(TOY))
    bare = str(tmp_path / 'bare.pth')
    torch.save(net.state_dict(), bare)  # no network_g: calibrate takes the option file's
    result = calibrate(bare, toy['val'], str(tmp_path / 'bare_head.pth'), device='cpu')
    stored = read_checkpoint(str(tmp_path / 'bare_head.pth'))
    assert set(stored) == {'params', NETWORK_KEY, HEAD_KEY} and stored[NETWORK_KEY] == TOY
    assert all(torch.equal(stored['params'][k], v) for k, v in net.state_dict().items())
    assert_same_head(read_head(str(tmp_path / 'bare_head.pth')), result['head'])
    cv2.imwrite(str(tmp_path / 'a.png'), to8(toy_image('natural', 'clean', np.random.default_rng(11))[1]))
    assert restore('--ckpt', tmp_path / 'bare_head.pth', '--explain', tmp_path / 'a.png', f"{tmp_path / 'out'}/") == 0
    assert report_rows(tmp_path / 'out')[1]['a.png']['task'] == 'clean'
