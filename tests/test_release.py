"""The shippable weights file: safetensors with the network options in its header, written by tools.release, named
``release`` by restore and benchmark; ``--threads`` on the command lines."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from safetensors import safe_open

from datprl_arch import weights
from basicsr.archs import build_network
from datprl_arch.data.image_io import ImageFormat, tensor_to_stored
from datprl_arch.restore import main as restore_main
from datprl_arch.tools import learning_curve, model_card, release
from datprl_arch.utils import threads
from datprl_arch.utils.checkpoint import (METADATA_KEY, NETWORK_KEY, SAFETENSORS_PARAM_KEY, CheckpointError,
                                          read_checkpoint, save_safetensors)
from datprl_arch.utils.precision import memory_format

from networks import TINY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP16_RESOLUTION = 2 ** -10  # float16's relative step: stored weights differ from float32 by at most this


def tiny(seed):
    torch.manual_seed(seed)
    return build_network(dict(TINY)).eval()


@pytest.fixture
def trained(tmp_path):
    """A tiny DATPRLRestormer saved as a training run does (``params`` are decoys), with training states beside it."""
    ema, decoy = tiny(0), tiny(1)
    models = tmp_path / 'experiments' / 'run' / 'models'
    states = tmp_path / 'experiments' / 'run' / 'training_states'
    models.mkdir(parents=True)
    states.mkdir()
    for it in (500, 1500):
        (states / f'{it}.state').write_bytes(b'')
    path = models / 'net_g_latest.pth'
    torch.save({'params': decoy.state_dict(), 'params_ema': ema.state_dict(), NETWORK_KEY: dict(TINY)}, path)
    return str(path), ema


def test_release_file_rebuilds_without_an_option_file_in_fp16(trained, tmp_path):
    ckpt, ema = trained
    out = str(tmp_path / 'release.safetensors')
    info = release.release(ckpt, out, recipe='options/release/x.yml')
    assert (info['iteration'], info['param_key'], info['recipe']) == ('1500', 'params_ema', 'options/release/x.yml')
    assert info['sha256'] == release.file_sha256(out) and info['bytes'] == os.path.getsize(out)
    with safe_open(out, framework='pt') as f:  # a plain safetensors file: any reader sees the options, no pickle
        assert json.loads(f.metadata()[NETWORK_KEY]) == TINY
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    checkpoint = read_checkpoint(out)
    assert checkpoint[NETWORK_KEY] == TINY and checkpoint[METADATA_KEY]['iteration'] == '1500'
    net = build_network(checkpoint[NETWORK_KEY])
    net.load_state_dict(checkpoint[SAFETENSORS_PARAM_KEY])
    for name, value in ema.state_dict().items():  # the EMA weights, not the decoys, to float16's precision
        assert torch.allclose(net.state_dict()[name], value, rtol=FP16_RESOLUTION, atol=1e-7), name


def test_values_beyond_float16_stay_float32(tmp_path):
    out = str(tmp_path / 'w.safetensors')
    save_safetensors({'small': torch.ones(2), 'count': torch.tensor([1e6, 2.0]), 'index': torch.arange(3)}, out,
                     {'type': 'X'}, dtype=torch.float16)
    stored = read_checkpoint(out)[SAFETENSORS_PARAM_KEY]
    assert stored['small'].dtype == torch.float16 and stored['count'].dtype == torch.float32
    assert stored['count'][0] == 1e6 and stored['index'].dtype == torch.int64


def test_release_command_refuses_to_replace_without_overwrite(trained, tmp_path, capsys):
    ckpt, _ = trained
    out = tmp_path / 'release.safetensors'
    out.write_bytes(b'keep')
    with pytest.raises(SystemExit) as exc:
        release.main(['--ckpt', ckpt, '--out', str(out)])
    assert exc.value.code == 2 and 'pass --overwrite' in capsys.readouterr().err
    assert out.read_bytes() == b'keep'
    assert release.main(['--ckpt', ckpt, '--out', str(out), '--overwrite']) == 0
    assert 'iteration 1500, sha256 ' in capsys.readouterr().out


def test_release_command_names_a_checkpoint_without_network_options(tmp_path):
    plain = tmp_path / 'plain.pth'
    torch.save({'params': tiny(0).state_dict()}, plain)
    with pytest.raises(SystemExit) as exc:
        release.main(['--ckpt', str(plain), '--out', str(tmp_path / 'x.safetensors')])
    assert f'{plain} carries no network_g options' in str(exc.value.code)
    assert not (tmp_path / 'x.safetensors').exists()


def test_a_damaged_safetensors_file_is_named(tmp_path):
    bad = tmp_path / 'bad.safetensors'
    bad.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
    with pytest.raises(CheckpointError, match=f'cannot read {bad} as a safetensors file'):
        read_checkpoint(str(bad))


def test_restore_without_ckpt_uses_the_release_model(trained, tmp_path, monkeypatch):
    ckpt, ema = trained
    shipped = str(tmp_path / 'shipped.safetensors')
    release.release(ckpt, shipped)
    monkeypatch.setattr(weights, 'RELEASE_FILE', shipped)
    img = (np.random.default_rng(0).random((24, 32, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / 'in.png'), img)
    assert restore_main([str(tmp_path / 'in.png'), str(tmp_path / 'out.png'), '--quiet']) == 0
    assert restore_main(['--ckpt', 'release', str(tmp_path / 'in.png'), str(tmp_path / 'named.png'), '--quiet']) == 0
    net = build_network(dict(TINY))
    net.load_state_dict(read_checkpoint(shipped)[SAFETENSORS_PARAM_KEY])
    layout = memory_format(torch.device('cpu'))
    x = torch.from_numpy(img[..., ::-1].astype(np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        want = net.eval().to(memory_format=layout)(x.contiguous(memory_format=layout))
    want = tensor_to_stored(want, ImageFormat(8, 3))
    out, named = cv2.imread(str(tmp_path / 'out.png')), cv2.imread(str(tmp_path / 'named.png'))
    assert np.array_equal(out, named) and np.abs(out.astype(int) - want.astype(int)).max() <= 1


def test_restore_without_a_shipped_model_says_where_it_looked(tmp_path, monkeypatch):
    missing = str(tmp_path / 'absent.safetensors')
    monkeypatch.setattr(weights, 'RELEASE_FILE', missing)
    cv2.imwrite(str(tmp_path / 'in.png'), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(SystemExit) as exc:
        restore_main([str(tmp_path / 'in.png'), str(tmp_path / 'out.png')])
    assert f'checkpoint {missing} does not exist' in str(exc.value.code)


# ------------------------------------------------------------------------------------------------ --threads
def test_threads_flag_is_taken_out_of_basicsr_command_lines():
    argv, count = threads.pop_threads_flag(['train.py', '-opt', 'a.yml', '--threads', '3', '--auto_resume'], 'x')
    assert argv == ['train.py', '-opt', 'a.yml', '--auto_resume'] and count == 3
    argv, count = threads.pop_threads_flag(['train.py', '-opt', 'a.yml', '--threads=2'], 'x')
    assert argv == ['train.py', '-opt', 'a.yml'] and count == 2
    assert threads.pop_threads_flag(['train.py', '-opt', 'a.yml'], 'x') == (['train.py', '-opt', 'a.yml'], None)


@pytest.mark.parametrize('value', ['0', 'two', '-1'])
def test_a_bad_thread_count_is_named(value, capsys):
    with pytest.raises(SystemExit) as exc:
        threads.pop_threads_flag(['train.py', '--threads', value], 'datprl-train')
    assert exc.value.code == 2 and 'expected a number of threads (an integer >= 1)' in capsys.readouterr().err


def test_default_threads_follow_omp_num_threads(monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    assert threads.default_threads() == 1
    monkeypatch.delenv('OMP_NUM_THREADS')
    assert threads.default_threads() == len(os.sched_getaffinity(0))


def test_restore_threads_reach_torch(trained, tmp_path):
    ckpt, _ = trained
    cv2.imwrite(str(tmp_path / 'in.png'), np.zeros((8, 8, 3), np.uint8))
    before = torch.get_num_threads()
    try:
        assert restore_main(['--ckpt', ckpt, '--threads', '1', str(tmp_path / 'in.png'), str(tmp_path / 'o.png'),
                             '--quiet']) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_test_runner_logs_its_threads(tmp_path):
    """``datprl-test --threads 1``: BasicSR's parser never sees the flag (it reports the missing file), torch gets 1."""
    code = ('import sys, torch; from datprl_arch.test import main; '
            "sys.argv = ['datprl-test', '--threads', '1', '-opt', 'missing.yml']\n"
            'try:\n    main()\nexcept SystemExit as e:\n    print(torch.get_num_threads(), e.code)')
    out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[0] == '1' and "missing.yml' does not exist" in out.stdout


# ------------------------------------------------------------------------------------------------ learning curve
def _round(psnrs):
    sets = {name: {'domain': domain, 'task': task, 'psnr': psnr} for name, (domain, task, psnr) in psnrs.items()}
    return {'sets': sets, 'average': {}, 'domains': {}}


def test_learning_curve_gains_against_the_inputs(tmp_path, capsys):
    report = {'rows': [{'set': 'a', 'task': 'sr4', 'psnr_in': 20.0}, {'set': 'b', 'task': 'ct', 'psnr_in': 30.0},
                       {'set': 'c', 'task': 'clean', 'psnr_in': None}]}
    (tmp_path / 'report.json').write_text(json.dumps(report))
    rounds = {'2000': _round({'a': ('natural', 'sr4', 23.0), 'b': ('medical', 'ct', 31.0),
                              'c': ('natural', 'clean', 40.0)}),
              '1000': _round({'a': ('natural', 'sr4', 21.0), 'b': ('medical', 'ct', 29.0),
                              'c': ('natural', 'clean', 45.0)})}
    (tmp_path / 'metrics.json').write_text(json.dumps(rounds))
    out = tmp_path / 'img' / 'curve.png'
    assert learning_curve.main([f'{tmp_path / "metrics.json"}=run', '--inputs', str(tmp_path / 'report.json'),
                                '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    assert '| run | 1000 | +0.00 | +1.00 | -1.00 | 45.0 dB |' in printed  # iterations ascending, mean of domains
    assert '| run | 2000 | +2.00 | +3.00 | +1.00 | 40.0 dB |' in printed
    assert out.read_bytes()[:4] == b'\x89PNG'


def test_learning_curve_names_a_report_without_inputs(tmp_path):
    (tmp_path / 'report.json').write_text(json.dumps({'rows': []}))
    with pytest.raises(SystemExit) as exc:
        learning_curve.main(['m.json', '--inputs', str(tmp_path / 'report.json'), '--out', str(tmp_path / 'c.png')])
    assert 'holds no degraded set with an input PSNR' in str(exc.value.code)


# ------------------------------------------------------------------------------------------------ model card
def _row(name, domain, task, psnr_in, psnr_out, checkpoint='md_mini_release'):
    gain = None if task == 'clean' else psnr_out - psnr_in
    return {'set': name, 'domain': domain, 'task': task, 'checkpoint': checkpoint, 'n_images': 12,
            'psnr_in': None if task == 'clean' else psnr_in, 'psnr_out': psnr_out, 'gain_psnr': gain}


def test_model_card_states_the_file_the_figures_and_the_targets(trained, tmp_path):
    ckpt, _ = trained
    weights_file = str(tmp_path / 'md_mini_release.safetensors')
    info = release.release(ckpt, weights_file, recipe='options/release/r.yml')
    test_rows = [_row('t_sr4', 'natural', 'sr4', 24.0, 24.1), _row('t_haze', 'remote_sensing', 'dehaze', 12.0, 21.0),
                 _row('t_other', 'natural', 'sr4', 24.0, 30.0, checkpoint='net_g_latest')]
    unseen_rows = [_row('u_sr4', 'natural', 'sr4', 25.0, 26.5), _row('u_clean', 'natural', 'clean', None, 41.0),
                   _row('u_rs_clean', 'remote_sensing', 'clean', None, 36.0)]
    for name, rows in (('test', test_rows), ('unseen', unseen_rows)):
        (tmp_path / f'{name}.json').write_text(json.dumps({'rows': rows}))
    analysis = tmp_path / 'analysis'
    analysis.mkdir()
    (analysis / 'nmi.json').write_text(json.dumps({'degradation': {'task': 0.61, 'domain': 0.4, 'source': 0.7}}))
    (analysis / 'gates.json').write_text(json.dumps({'a': {'feature': 0.6, 'prompt': 0.4},
                                                     'b': {'feature': 0.3, 'prompt': 0.7}}))
    out = tmp_path / 'card.md'
    assert model_card.main(['--weights', weights_file, '--report', f'test={tmp_path / "test.json"}', '--report',
                            f'unseen={tmp_path / "unseen.json"}', '--checkpoint', 'md_mini_release', '--analysis',
                            str(analysis), '--training', 'iterations: 4', '--out', str(out)]) == 0
    text = out.read_text()
    assert f"sha256 `{info['sha256']}`" in text and '- recipe: `options/release/r.yml`' in text
    assert '| t_sr4 | 12 | 24.00 | 24.10 | +0.10 |' in text and 't_other' not in text  # the chosen checkpoint only
    assert '| mean of the 2 degraded sets | 24 | 18.00 | 22.55 | **+4.55** |' in text
    assert '- every test set at least +0.3 dB above its input: **missed** (worst t_sr4 +0.10 dB)' in text
    assert '- test mean gain at least +4.0 dB: **met** (+4.55 dB)' in text
    assert 'in every domain (unseen check): **missed** (natural 41.0 dB, remote_sensing 36.0 dB)' in text
    assert '- t_sr4: +0.10 dB over its input' in text and '- iterations: 4' in text
    assert '- degradation: NMI with task 0.61, domain 0.40, source 0.70' in text
    assert "the prompt's share a_p / (a_f + a_p) is 0.40-0.70 over the 2 prompted blocks" in text


def test_model_card_asks_which_checkpoint_of_a_shared_report(trained, tmp_path):
    ckpt, _ = trained
    weights_file = str(tmp_path / 'w.safetensors')
    release.release(ckpt, weights_file)
    rows = [_row('a', 'natural', 'sr4', 1, 2), _row('a', 'natural', 'sr4', 1, 3, checkpoint='other')]
    (tmp_path / 'r.json').write_text(json.dumps({'rows': rows}))
    with pytest.raises(SystemExit) as exc:
        model_card.main(['--weights', weights_file, '--report', f'test={tmp_path / "r.json"}', '--out',
                         str(tmp_path / 'c.md')])
    assert "choose the checkpoint with --checkpoint (it holds ['md_mini_release', 'other'])" in str(exc.value.code)
    assert not (tmp_path / 'c.md').exists()
