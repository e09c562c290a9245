"""End to end, in subprocesses (the logger and sys.argv are process-global): train on CPU, auto-resume from another
directory through BasicSR's own train_pipeline, then evaluate with the test runner."""
import glob
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml

from basicsr.metrics import calculate_psnr

from conftest import write_png_pairs
from networks import SMALL_PROMPTS

# The network every end-to-end run trains: the project's DATPRL-Restormer, as small as it goes.
NETWORK_G = SMALL_PROMPTS
SUBPROCESS_TIMEOUT_S = 300


def dataset(name, gt, lq, **extra):
    return dict(name=name, type='PairedImageDataset', dataroot_gt=gt, dataroot_lq=lq, io_backend={'type': 'disk'},
                **extra)


def train_options(gt, lq):
    return dict(
        name='e2e', model_type='SRModel', scale=1, num_gpu='auto', manual_seed=0,
        datasets=dict(train=dataset('pairs', gt, lq, gt_size=16, use_hflip=True, use_rot=True, num_worker_per_gpu=0,
                                    batch_size_per_gpu=2, dataset_enlarge_ratio=4)),
        network_g=NETWORK_G, path=dict(pretrain_network_g=None, resume_state=None),
        train=dict(optim_g=dict(type='Adam', lr=1e-3, betas=[0.9, 0.99]),
                   scheduler=dict(type='MultiStepLR', milestones=[100], gamma=0.5),
                   total_iter=4, warmup_iter=-1, pixel_opt=dict(type='L1Loss', loss_weight=1.0)),
        logger=dict(print_freq=1, save_checkpoint_freq=2, use_tb_logger=False))


def evaluation_options(gt, lq, checkpoint):
    return dict(
        name='e2e_test', model_type='SRModel', scale=1, num_gpu='auto', manual_seed=0,
        datasets=dict(test_1=dataset('pairs', gt, lq)), network_g=NETWORK_G,
        path=dict(pretrain_network_g=checkpoint, strict_load_g=True),
        val=dict(save_img=True, suffix=None, metrics=dict(psnr=dict(type='calculate_psnr', crop_border=0))))


def write_yaml(path, opt):
    with open(path, 'w') as f:
        yaml.safe_dump(opt, f, sort_keys=False)
    return str(path)


def run(args, cwd):
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def params(path):
    return torch.load(path, map_location='cpu', weights_only=True)['params']


@pytest.fixture
def layout(tmp_path):
    """Data, option files (in their own folder) and two working directories: the run root and another one."""
    gt, lq = write_png_pairs(str(tmp_path / 'data'))
    for sub in ('opts', 'root', 'elsewhere'):
        (tmp_path / sub).mkdir()
    return dict(gt=gt, lq=lq, opts=tmp_path / 'opts', root=tmp_path / 'root', elsewhere=tmp_path / 'elsewhere')


@pytest.mark.slow
def test_train_auto_resume_from_another_directory_then_test(layout):
    root, elsewhere = layout['root'], layout['elsewhere']
    train_yml = write_yaml(layout['opts'] / 'train.yml', train_options(layout['gt'], layout['lq']))

    # 1. python -m datprl_arch.train: 4 CPU iterations (num_gpu: auto), experiments under the current directory.
    first = run(['-m', 'datprl_arch.train', '-opt', train_yml], cwd=root)
    exp = root / 'experiments' / 'e2e'
    assert sorted(os.listdir(exp / 'models')) == ['net_g_2.pth', 'net_g_4.pth', 'net_g_latest.pth']
    assert sorted(os.listdir(exp / 'training_states')) == ['2.state', '4.state']
    assert torch.load(exp / 'training_states' / '4.state', weights_only=True)['iter'] == 4
    assert 'INFO: Start training from epoch: 0, iter: 0' in first.stderr
    logs = glob.glob(str(exp / 'train_e2e_*.log'))
    assert len(logs) == 1
    log = open(logs[0]).read()
    assert 'INFO: Network [DATPRLRestormer] is created.' in log and re.search(r'iter:\s+4, lr:', log)

    # 2. BasicSR's own train_pipeline (the README one-liner) for the same root, started from another directory with
    #    the option file by absolute path: auto-resume finds the run's states under the root and continues at 4.
    code = f'import datprl_arch; from basicsr.train import train_pipeline; train_pipeline({str(root)!r})'
    second = run(['-c', code, '-opt', train_yml, '--auto_resume', '--force_yml', 'train:total_iter=6'], cwd=elsewhere)
    assert 'INFO: Resuming training from epoch: ' in second.stderr
    assert re.search(r'INFO: Start training from epoch: \d+, iter: 4\n', second.stderr)
    assert f"Set pretrain_network_g to {exp / 'models' / 'net_g_4.pth'}" in second.stdout
    assert sorted(os.listdir(exp / 'training_states')) == ['2.state', '4.state', '6.state']
    assert os.listdir(root / 'experiments') == ['e2e'] and os.listdir(elsewhere) == []  # nothing archived or strayed
    before, after = params(exp / 'models' / 'net_g_4.pth'), params(exp / 'models' / 'net_g_6.pth')
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)

    # 3. python -m datprl_arch.test: metrics in the log, restored images, PSNR matching the saved images.
    checkpoint = str(exp / 'models' / 'net_g_latest.pth')
    test_yml = write_yaml(layout['opts'] / 'test.yml', evaluation_options(layout['gt'], layout['lq'], checkpoint))
    run(['-m', 'datprl_arch.test', '-opt', test_yml], cwd=root)
    results = root / 'results' / 'e2e_test'
    log = open(glob.glob(str(results / 'test_e2e_test_*.log'))[0]).read()
    reported = float(re.search(r'Validation pairs\n\t # psnr: ([\d.]+)', log).group(1))
    names = sorted(os.listdir(layout['gt']))
    restored = [cv2.imread(str(results / 'visualization' / 'pairs' / f'{n[:-4]}_e2e_test.png')) for n in names]
    psnr = np.mean([calculate_psnr(img, cv2.imread(os.path.join(layout['gt'], n)), crop_border=0)
                    for img, n in zip(restored, names)])
    assert reported == pytest.approx(psnr, abs=1e-4)
