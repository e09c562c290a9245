"""scripts/gpu_check.sh (the proof on a GPU) as far as a CPU machine can check it: the script parses, stops clearly
without CUDA, and its dry run prints commands that parse; the checks of scripts/gpu_check.py on made-up runs."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'scripts', 'gpu_check.sh')
SCRIPT_TIMEOUT_S = 300


def _helper():
    spec = importlib.util.spec_from_file_location('gpu_check', os.path.join(REPO, 'scripts', 'gpu_check.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _script(*args, **env):
    return subprocess.run(['bash', SCRIPT, *args], capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S,
                          env=dict(os.environ, PYTHON=sys.executable, PYTHONPATH=REPO, **env))


def test_the_script_parses_and_stops_without_cuda_before_writing_anything():
    assert subprocess.run(['bash', '-n', SCRIPT]).returncode == 0
    results = os.path.join(REPO, 'results', 'gpu_check')
    before = set(os.listdir(results)) if os.path.isdir(results) else set()
    done = _script(CUDA_VISIBLE_DEVICES='')
    assert done.returncode == 2, done.stderr
    assert 'gpu_check: no CUDA device is visible' in done.stderr and 'nothing was run or written' in done.stderr
    assert (set(os.listdir(results)) if os.path.isdir(results) else set()) == before


@pytest.mark.slow
def test_the_dry_run_prints_every_step_and_checks_the_commands_parse():
    done = _script('--dry-run')
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    for amp in ('bf16', 'fp16'):
        assert f'gpu_check: train_{amp}: ' in out and f'train:amp_dtype={amp}' in out
    assert out.count('overrides: 8 apply to options/demo/md_mini_train.yml') == 3
    assert 'torch.distributed.run --nproc_per_node=1' in out and '--launcher pytorch --auto_resume' in out
    assert 'train:total_iter=100' in out and 'train:total_iter=150' in out and '--resumed-from 100' in out
    assert '-m datprl_arch.bench --device cuda --amp bf16 --skip-speedup' in out
    assert '--compile --configs 6t --impls datprl' in out and '-m pytest -q' in out
    assert out.rstrip().endswith('gpu_check: dry run: every command parses')


LOG = '''2026-12-02 10:00:00,000 INFO: Start training from epoch: 0, iter: 0
2026-12-02 10:00:01,000 INFO: [gpu_c..][epoch:  0, iter:      10, lr:(1.000e-03,1.000e-03,)] [eta: 0:00:10, \
time (data): 0.200 (0.010)] l_pix: {0:.4e} l_fft: 1.0000e-01
2026-12-02 10:00:02,000 INFO: [gpu_c..][epoch:  0, iter:      20, lr:(1.000e-03,1.000e-03,)] [eta: 0:00:05, \
time (data): 0.100 (0.010)] l_pix: 1.5000e-01 l_fft: 1.0000e-01
2026-12-02 10:00:03,000 INFO: [gpu_c..][epoch:  1, iter:   1,000, lr:(1.000e-03,1.000e-03,)] [eta: -1 day, \
23:59:52, time (data): 0.100 (0.010)] l_pix: {1:.4e} l_fft: 1.0000e-01
'''


def _run(tmp_path, first, last, weight=1.0, resumed=''):
    exp = tmp_path / 'exp'
    (exp / 'models').mkdir(parents=True)
    (exp / 'train_x_1.log').write_text(resumed + LOG.format(first, last))
    torch.save({'params': {'w': torch.full((2,), weight)}, 'params_ema': {'w': torch.ones(2)}},
               exp / 'models' / 'net_g_latest.pth')
    (exp / 'metrics.json').write_text('{"1000": {"average": {"psnr": 25.5, "ssim": 0.75}}}')
    return str(exp)


def test_the_training_check_reports_the_figures_and_fails_on_nan_or_a_rising_loss(tmp_path, capsys):
    helper = _helper()
    helper.training(_run(tmp_path / 'good', 0.3, 0.1), falling_loss=True, resumed_from=None)
    figures = capsys.readouterr().out
    assert 'iterations logged: 10..1000 (3 lines)' in figures and 's/iter (median, second half): 0.1000' in figures
    assert 'l_pix first/last quarter: 3.0000e-01 -> 1.0000e-01' in figures
    assert 'finite weight tensors (params + params_ema): 2' in figures
    assert 'validation average at 1000: psnr 25.5000, ssim 0.7500' in figures
    for run, falling, resumed_from, message in [
            (_run(tmp_path / 'nan', 0.3, 0.1, weight=float('nan')), True, None, 'params.w holds non-finite values'),
            (_run(tmp_path / 'rising', 0.1, 0.3), True, None, 'l_pix did not fall'),
            (_run(tmp_path / 'fresh', 0.3, 0.1), False, 100, 'did not resume from iteration 100')]:
        with pytest.raises(SystemExit) as stopped:
            helper.training(run, falling_loss=falling, resumed_from=resumed_from)
        assert stopped.value.code == 1 and message in capsys.readouterr().err
    resumed = 'INFO: Resuming training from epoch: 0, iter: 100.\n'
    helper.training(_run(tmp_path / 'resumed', 0.1, 0.3, resumed=resumed), falling_loss=False, resumed_from=100)


def test_the_override_check_names_a_key_force_yml_cannot_create(tmp_path, capsys):
    opt = tmp_path / 'o.yml'
    opt.write_text('name: x\ntrain:\n  lr: !!float 1e-3\n  scheduler: {periods: [10]}\n')
    helper = _helper()
    helper.overrides(str(opt), ['name=y', 'train:scheduler:periods=[5]', 'train:amp_dtype=fp16'])
    assert 'overrides: 3 apply' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        helper.overrides(str(opt), ['val:val_freq=5'])
    assert "'val:val_freq=5': val is not in" in capsys.readouterr().err
