"""Checkpoint formats: BasicSR, official Lightning, plain, DDP-wrapped, safetensors; clear errors otherwise."""
import argparse
import os

import pytest
import torch

import datprl_arch  # noqa: F401
from basicsr.archs import build_network
from datprl_arch.utils.checkpoint import CheckpointError, load_checkpoint

GOLDEN = os.path.join(os.path.dirname(__file__), 'data', 'restormer_taskprompt_xattn.pt')


@pytest.fixture(scope='module')
def golden():
    return torch.load(GOLDEN, weights_only=True)


def fresh(golden):
    return build_network({'type': golden['arch'], **golden['config']}).eval()


def assert_restores(net, golden):
    with torch.no_grad():
        assert (net(golden['input']) - golden['output']).abs().max() < 1e-5


def prefixed(state_dict, prefix):
    return {prefix + k: v for k, v in state_dict.items()}


@pytest.mark.parametrize('layout', ['params', 'params_ema', 'plain', 'module', 'lightning'])
def test_formats_load(tmp_path, golden, layout):
    sd = golden['state_dict']
    noise = {k: torch.randn_like(v) for k, v in sd.items()}
    checkpoint = {
        'params': {'params': sd},
        'params_ema': {'params': noise, 'params_ema': sd},  # EMA weights are preferred
        'plain': sd,
        'module': {'params': prefixed(sd, 'module.')},
        'lightning': {'state_dict': prefixed(sd, 'net.'), 'epoch': 149, 'global_step': 1000,
                      'optimizer_states': [{'state': {}, 'param_groups': [{'lr': 2e-4}]}]},
    }[layout]
    path = tmp_path / 'w.pth'
    torch.save(checkpoint, path)
    assert_restores(load_checkpoint(fresh(golden), str(path)), golden)


def test_explicit_param_key_wins(tmp_path, golden):
    torch.save({'params': golden['state_dict'], 'params_ema': {}}, tmp_path / 'w.pth')
    assert_restores(load_checkpoint(fresh(golden), str(tmp_path / 'w.pth'), param_key='params'), golden)


def test_safetensors(tmp_path, golden):
    save_file = pytest.importorskip('safetensors.torch').save_file
    save_file({k: v.contiguous() for k, v in golden['state_dict'].items()}, str(tmp_path / 'w.safetensors'))
    assert_restores(load_checkpoint(fresh(golden), str(tmp_path / 'w.safetensors')), golden)


def test_wrong_network_names_missing_and_unexpected_keys(tmp_path, golden):
    sd = dict(golden['state_dict'])
    sd.pop('output.weight')
    sd['extra.weight'] = torch.zeros(1)
    torch.save({'params': sd}, tmp_path / 'w.pth')
    expected = r"1 missing keys \['output.weight'\].*1 unexpected keys \['extra.weight'\]"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(fresh(golden), str(tmp_path / 'w.pth'))


def test_arbitrary_objects_are_never_unpickled(tmp_path, golden):
    torch.save({'params': golden['state_dict'], 'args': argparse.Namespace(lr=1)}, tmp_path / 'w.pth')
    with pytest.raises(CheckpointError, match='weights_only=True'):
        load_checkpoint(fresh(golden), str(tmp_path / 'w.pth'))


def test_missing_file_and_non_checkpoint(tmp_path, golden):
    with pytest.raises(CheckpointError, match='does not exist'):
        load_checkpoint(fresh(golden), str(tmp_path / 'nope.pth'))
    (tmp_path / 'notes.pth').write_text('not a checkpoint')
    with pytest.raises(CheckpointError, match='cannot read'):
        load_checkpoint(fresh(golden), str(tmp_path / 'notes.pth'))


@pytest.mark.parametrize('trust', [True, False], ids=['trust_pickle', 'weights_only'])
def test_convert_of_a_truncated_file_names_it(tmp_path, golden, capsys, trust):
    """N76: with or without --trust-pickle, a checkpoint cut in half ends with one message naming the file."""
    from datprl_arch.tools.convert_checkpoint import main as convert_main

    whole = tmp_path / 'whole.pth'
    torch.save({'params': golden['state_dict']}, whole)
    data = whole.read_bytes()
    (tmp_path / 'trunc.pth').write_bytes(data[:len(data) // 2])
    flags = ['--trust-pickle'] if trust else []
    with pytest.raises(SystemExit) as exit_info:
        convert_main([str(tmp_path / 'trunc.pth'), str(tmp_path / 'out.pth'), *flags])
    message = str(exit_info.value)
    assert message.startswith(f"convert_checkpoint: error: cannot read {tmp_path / 'trunc.pth'} as a PyTorch "
                              'checkpoint'), message
    assert 'Traceback' not in message + capsys.readouterr().err and not (tmp_path / 'out.pth').exists()
    assert ('truncated, damaged or not a checkpoint' in message) == trust


def test_training_state_is_not_mistaken_for_weights(tmp_path, golden):
    torch.save({'iter': 10, 'epoch': 1, 'optimizers': [], 'schedulers': []}, tmp_path / '10.state')
    with pytest.raises(CheckpointError, match='not tensors'):
        load_checkpoint(fresh(golden), str(tmp_path / '10.state'))


@pytest.mark.slow
def test_convert_lightning_checkpoint_with_python_objects(tmp_path, golden):
    import subprocess
    import sys
    src = tmp_path / 'official.ckpt'
    torch.save({'state_dict': prefixed(golden['state_dict'], 'net.'), 'hyper_parameters': argparse.Namespace(lr=2e-4),
                'epoch': 149}, src)
    cmd = [sys.executable, '-m', 'datprl_arch.tools.convert_checkpoint', str(src), str(tmp_path / 'w.pth')]
    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode != 0 and '--trust-pickle' in refused.stderr and not (tmp_path / 'w.pth').exists()
    done = subprocess.run(cmd + ['--trust-pickle'], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert set(torch.load(tmp_path / 'w.pth', weights_only=True)) == {'params'}
    assert_restores(load_checkpoint(fresh(golden), str(tmp_path / 'w.pth')), golden)
