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
from datprl_arch.tools import release
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
