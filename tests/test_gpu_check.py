"""scripts/gpu_check.sh (the proof on a GPU) as far as a CPU machine can check it: the script parses, stops clearly
without CUDA, its dry run prints commands that parse and checks every ``python -m`` target; the checks of
scripts/gpu_check.py on made-up runs (they must fail a broken run); the install of prepared wheels; and, slow, the
rehearsal: the wheels prepared for this Python, a virtual environment holding only what the GPU image holds, and
``--cpu-smoke`` end to end in it without network (scripts/gpu_check_prepare.py)."""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'scripts', 'gpu_check.sh')
SCRIPT_TIMEOUT_S = 300
REHEARSAL_TIMEOUT_S = 3600


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'scripts', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def helper():
    return _load('gpu_check')


def _script(*args, **env):
    path = os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')]))  # gpu_check's own wheels stay
    return subprocess.run(['bash', SCRIPT, *args], capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S,
                          env=dict(os.environ, PYTHON=sys.executable, PYTHONPATH=path, **env))


def test_the_script_parses_and_stops_without_cuda_before_writing_anything():
    assert subprocess.run(['bash', '-n', SCRIPT]).returncode == 0
    results = os.path.join(REPO, 'results', 'gpu_check')
    before = set(os.listdir(results)) if os.path.isdir(results) else set()
    done = _script(CUDA_VISIBLE_DEVICES='')
    assert done.returncode == 2, done.stderr
    assert 'gpu_check: no CUDA device is visible' in done.stderr and 'nothing was run or written' in done.stderr
    assert (set(os.listdir(results)) if os.path.isdir(results) else set()) == before


def test_unknown_steps_and_budgets_are_usage_errors():
    for args, message in [(['--only', 'train_bf16,tset'], "unknown step 'tset'"),
                          (['--skip', 'bench', '--only'], '--only needs a value'),
                          (['--budget', '8m'], '--budget 8m: expected seconds')]:
        done = _script(*args)
        assert done.returncode == 2 and message in done.stderr, done.stderr


@pytest.mark.slow
def test_the_dry_run_prints_every_step_and_checks_the_commands_and_modules():
    done = _script('--dry-run')
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    assert '-m datprl_arch.mdmini --out datasets/md_mini --no-unseen' in out  # the module that exists (H1)
    for amp in ('bf16', 'fp16'):
        assert f'gpu_check: train_{amp}: ' in out and f'train:amp_dtype={amp}' in out
        assert f'--amp {amp} --device cuda --falling-loss' in out
    assert out.count('overrides: 8 apply to options/demo/md_mini_train.yml') == 3
    assert 'torch.distributed.run --nproc_per_node=1' in out and '--launcher pytorch --auto_resume' in out
    assert 'train:total_iter=150' in out and 'train:total_iter=300' in out and '--resumed-from 150' in out
    assert '--backend nccl --step-log' in out and 'dist_params:backend=nccl' in out
    assert '-m datprl_arch.bench --device cuda --configs 6t --impls official datprl datprl-checkpoint' in out
    assert '--compile --configs 6t --impls datprl' in out and '-m pytest -q' in out
    assert 'python -m targets: 6 resolve' in out
    assert out.rstrip().endswith('gpu_check: dry run: every command parses and every python -m target resolves')
    only = _script('--dry-run', '--only', 'tests,bench_compile').stdout
    assert 'gpu_check: tests:' in only and 'train_bf16' not in only and 'datprl_arch.mdmini' not in only


def test_a_python_m_target_that_does_not_resolve_is_named(helper, capsys):
    with pytest.raises(SystemExit) as stopped:
        helper.modules(['datprl_arch.mdmini', 'datprl_arch.data.mini'])
    assert stopped.value.code == 1
    assert 'python -m target(s) that do not resolve: datprl_arch.data.mini' in capsys.readouterr().err


def test_missing_imports_are_listed_with_what_to_carry(helper, capsys, monkeypatch):
    monkeypatch.setitem(helper.THIRD_PARTY, 'no_such_module_x', 'no-such-dist')
    with pytest.raises(SystemExit) as stopped:
        helper.imports()
    err = capsys.readouterr().err
    assert stopped.value.code == helper.NO_CUDA
    assert "1 module(s) do not import; nothing was run:\n  no_such_module_x (pip: no-such-dist;" in err


# ---------------------------------------------------------------------------------------------- prepared wheels
def _wheel(folder, name='gpucheckfake', version='1.0'):
    """A minimal pure-Python wheel providing module ``name``."""
    path = os.path.join(folder, f'{name}-{version}-py3-none-any.whl')
    info = f'{name}-{version}.dist-info'
    with zipfile.ZipFile(path, 'w') as wheel:
        wheel.writestr(f'{name}.py', 'VALUE = 42\n')
        wheel.writestr(f'{info}/METADATA', f'Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n')
        wheel.writestr(f'{info}/WHEEL',
                       'Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n')
        wheel.writestr(f'{info}/RECORD', f'{name}.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n')
    return os.path.basename(path)


def _manifest(folder, wheels, python=None):
    python = python or '.'.join(map(str, sys.version_info[:2]))
    with open(os.path.join(folder, 'manifest.json'), 'w') as f:
        json.dump({'python': python, 'wheels': wheels}, f)


def test_only_the_prepared_wheels_this_python_lacks_are_installed_offline(helper, tmp_path, capsys, monkeypatch):
    fake = _wheel(str(tmp_path))
    numpy_stand_in = _wheel(str(tmp_path), 'numpy_shadow_test')
    _manifest(str(tmp_path), {fake: {'module': 'gpucheckfake'}, numpy_stand_in: {'module': 'numpy'}})
    target = tmp_path / 'site'
    helper.install(str(tmp_path), str(target))
    out = capsys.readouterr().out
    assert 'installed from the prepared wheels: gpucheckfake' in out and 'already here: numpy' in out
    assert (target / 'gpucheckfake.py').is_file() and not (target / 'numpy_shadow_test.py').exists()
    monkeypatch.syspath_prepend(str(target))
    helper.install(str(tmp_path), str(target))  # a second call (a warm machine): nothing to install
    assert 'installed from the prepared wheels: none' in capsys.readouterr().out
    _manifest(str(tmp_path), {fake: {'module': 'gpucheckfake'}}, python='2.7')
    helper.install(str(tmp_path), str(target))  # prepared for another Python, but nothing is missing
    assert 'already here: gpucheckfake' in capsys.readouterr().out
    other = _wheel(str(tmp_path), 'gpucheckother')
    _manifest(str(tmp_path), {fake: {'module': 'gpucheckfake'}, other: {'module': 'gpucheckother'}}, python='2.7')
    with pytest.raises(SystemExit) as stopped:
        helper.install(str(tmp_path), str(target))
    err = capsys.readouterr().err
    assert stopped.value.code == helper.NO_CUDA and "prepared for Python 2.7" in err and "['gpucheckother']" in err


def test_prepare_never_empties_a_folder_of_other_files(tmp_path):
    prepare = _load('gpu_check_prepare')
    (tmp_path / 'notes.txt').write_text('mine')
    with pytest.raises(SystemExit, match='holds files that are not prepared wheels'):
        prepare._clear(str(tmp_path))
    assert (tmp_path / 'notes.txt').read_text() == 'mine'


# ---------------------------------------------------------------------------------------------- training checks
HEADER = '2026-12-02 10:00:00,000 INFO: use_amp: autocast in {amp} on cuda.\n'
LINE = ('2026-12-02 10:00:01,000 INFO: [gpu_c..][epoch:  0, iter: {it:7,d}, lr:(1.000e-03,)] [eta: -1 day, '
        '23:59:52, time (data): 0.100 (0.010)] l_pix: {pix:.4e} l_fft: 1.0000e-01\n')
ITERS = 40


def _run(root, name, first=0.3, last=0.1, amp='bf16', steps=ITERS, scale=None, nan=False, iters=ITERS,
         start=1, text=''):
    """A made-up run: a log with a linear l_pix curve, a training state, the latest weights."""
    exp = root / name
    (exp / 'models').mkdir(parents=True, exist_ok=True)
    (exp / 'training_states').mkdir(exist_ok=True)
    curve = ''.join(LINE.format(it=i, pix=first + (last - first) * (i - start) / max(iters - start, 1))
                    for i in range(start, iters + 1))
    (exp / f'train_x_{start}.log').write_text(text + HEADER.format(amp=amp) + curve)
    if start > 1:  # the resumed log is the newer one
        os.utime(exp / f'train_x_{start}.log', (2e9, 2e9))
    params = {'w': torch.full((2,), float('nan') if nan else 1.0)}
    torch.save({'params': params, 'params_ema': {'w': torch.ones(2)}}, exp / 'models' / 'net_g_latest.pth')
    state = {'iter': iters, 'optimizers': [{'state': {0: {'step': torch.tensor(float(steps))}}}],
             'scaler': {'scale': scale} if scale is not None else {}}
    torch.save(state, exp / 'training_states' / f'{iters}.state')
    return exp


def _training(helper, exp, **kwargs):
    args = dict(exp_dir=str(exp), amp='bf16', device='cuda', falling_loss=True, resumed_from=None, backend=None,
                step_log=None)
    args.update(kwargs)
    helper.training(argparse.Namespace(**args))


def test_the_training_check_reports_the_figures_of_a_good_run(helper, tmp_path, capsys):
    _training(helper, _run(tmp_path, 'bf16'))
    figures = capsys.readouterr().out
    assert 'autocast: bf16 on cuda' in figures and f'iterations logged: 1..{ITERS} ({ITERS} lines' in figures
    assert 'l_pix first/last quarter: 2.7692e-01 -> 1.2308e-01 (ratio 0.444; falls below 0.9)' in figures
    assert f'optimizer steps: {ITERS} of {ITERS} iterations' in figures
    assert 'finite weight tensors (params + params_ema): 2' in figures
    _training(helper, _run(tmp_path, 'fp16', amp='fp16', steps=ITERS - 5, scale=2.0 ** 12), amp='fp16')
    assert 'GradScaler scale: 4096.0' in capsys.readouterr().out


@pytest.mark.parametrize('case, kwargs, message', [
    ('flat', dict(first=0.3, last=0.28), 'l_pix did not fall by a margin'),
    ('fp32', dict(amp='float32'), 'no "use_amp: autocast in bf16 on cuda." line'),
    ('nan', dict(nan=True), 'params.w holds non-finite values'),
    ('steps', dict(steps=ITERS - 3), f'the optimizer stepped {ITERS - 3} times in {ITERS} iterations'),
    ('scale', dict(amp='fp16', scale=0.5), 'the GradScaler scale fell to 0.5'),
    ('scaler_skips', dict(amp='fp16', scale=1.0, steps=ITERS - 17), 'at most 16 skipped steps are expected'),
])
def test_the_training_check_fails_a_broken_run(helper, tmp_path, capsys, case, kwargs, message):
    amp = kwargs.get('amp', 'bf16') if kwargs.get('amp') != 'float32' else 'bf16'
    with pytest.raises(SystemExit) as stopped:
        _training(helper, _run(tmp_path, case, **kwargs), amp=amp)
    assert stopped.value.code == 1 and message in capsys.readouterr().err


def test_a_fall_back_to_gloo_fails_the_torchrun_check(helper, tmp_path, capsys):
    exp = _run(tmp_path, 'ddp')
    log = tmp_path / 'torchrun.log'
    log.write_text("RuntimeWarning: dist_params.backend: 'nccl' cannot run on this machine (no CUDA device); "
                   "using 'gloo'.\n")
    with pytest.raises(SystemExit):
        _training(helper, exp, backend='nccl', step_log=str(log))
    assert 'the run did not use nccl' in capsys.readouterr().err
    log.write_text('NCCL version 2.30.7+cuda13.0\n')
    _training(helper, exp, backend='nccl', step_log=str(log))
    assert 'process group: nccl (no fall-back)' in capsys.readouterr().out


def test_a_resumed_run_is_checked_over_both_logs(helper, tmp_path, capsys):
    half = ITERS // 2
    _run(tmp_path, 'ddp', first=0.3, last=0.2, iters=half)
    resumed = 'INFO: Resuming training from epoch: 0, iter: 20.\n'
    exp = _run(tmp_path, 'ddp', first=0.2, last=0.19, start=half + 1, iters=ITERS, text=resumed)
    _training(helper, exp, resumed_from=half)  # the second half alone is flat; the whole curve falls
    assert f'iterations logged: 1..{ITERS} ({ITERS} lines in 2 log(s))' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _training(helper, exp, resumed_from=10)
    assert 'did not resume from iteration 10' in capsys.readouterr().err


BENCH_LOG = '''device cuda, amp {amp}
config |     impl | params M | GFLOPs@256 | eval ms 1x3x256 | train ms 4x3x128 | peak MiB
-------+----------+----------+------------+-----------------+------------------+---------
    6t | official |    42.56 |      150.0 |            {oe} |             {ot} |     1323
    6t |   datprl |    42.56 |      140.0 |            {de} |             {dt} |     1250

speed-up over the official computation at the spec sizes (eval 1x3x128x128, train 2x3x64x64)
config |   impl | official eval ms | eval ms | eval speed-up
-------+--------+------------------+---------+--------------
    6t | datprl |             30.0 |    20.0 |         1.50x
'''


def test_the_compiled_speed_up_is_read_from_the_fp32_and_the_compiled_tables(helper, tmp_path, capsys):
    fp32, compiled = tmp_path / 'bench.log', tmp_path / 'bench_compile.log'
    fp32.write_text(BENCH_LOG.format(amp='none', oe=60, ot=300, de=40, dt=250)
                    + BENCH_LOG.format(amp='bf16', oe=30, ot=150, de=20, dt=100))  # the fp32 table comes first
    compiled.write_text(BENCH_LOG.format(amp='bf16', oe=1, ot=1, de=15, dt=75))
    helper.speedup(str(fp32), str(compiled))
    out = capsys.readouterr().out
    assert 'eval: ours bf16 + compile vs official fp32 (eval ms 1x3x256): 4.00x (target 3x)' in out
    assert 'train: ours bf16 + compile vs official fp32 (train ms 4x3x128): 4.00x (target 3x)' in out


def test_the_override_check_names_a_key_force_yml_cannot_create(helper, tmp_path, capsys):
    opt = tmp_path / 'o.yml'
    opt.write_text('name: x\ntrain:\n  lr: !!float 1e-3\n  scheduler: {periods: [10]}\n')
    helper.overrides(str(opt), ['name=y', 'train:scheduler:periods=[5]', 'train:amp_dtype=fp16'])
    assert 'overrides: 3 apply' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        helper.overrides(str(opt), ['val:val_freq=5'])
    assert "'val:val_freq=5': val is not in" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the rehearsal
@pytest.mark.slow
def test_the_rehearsal_runs_the_cpu_smoke_offline_in_the_gpu_image(tmp_path):
    """What the GPU machine does, on this machine's Python: prepared wheels, an environment of the GPU image's
    packages only, the dry run and --cpu-smoke without network (needs PyPI here to prepare and build the venv)."""
    done = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'gpu_check_prepare.py'), 'rehearse',
                           str(tmp_path)], capture_output=True, text=True, timeout=REHEARSAL_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    assert 'installed from the prepared wheels: basicsr, lmdb, mpl_toolkits.basemap_data, pydicom' in done.stdout
    figures = (tmp_path / 'out' / 'figures.md').read_text()
    for step in ('data', 'train_bf16', 'train_fp16', 'torchrun', 'bench'):
        assert f'\n## {step}\n' in figures and f'**{step}: passed in' in figures, figures[-3000:]
    assert figures.count('process group: gloo (no fall-back)') == 2  # the torchrun run and its resumed run
    assert 'iterations logged: 1..4 (4 lines in 2 log(s))' in figures
    assert '**result: every step run passed**' in figures
    assert sorted(os.listdir(tmp_path / 'out')) == sorted(['figures.md', 'data.log', 'train_bf16.log',
                                                           'train_fp16.log', 'torchrun.log', 'bench.log'])
