"""The DATPRL training model end to end: every loss on through BasicSR's runner, kill and resume, non-finite losses,
atomic saves, option validation. Runs use tiny multi-domain data (two natural 8-bit sources, one medical 16-bit
grayscale source) in subprocesses; model-level checks build the model in-process."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import OrderedDict

import cv2
import pytest
import torch
import yaml

import datprl_arch  # noqa: F401
from basicsr.models import build_model
from datprl_arch.options import OptionFileError
from datprl_arch.priors.encoders import encode_files, hash_encoder
from datprl_arch.utils import precision
from datprl_arch.utils.atomic import atomic_torch_save
from datprl_arch.utils.precision import cpu_bf16_flags

from networks import SMALL_PROMPTS
from toy import write_pairs

NETWORK = dict(SMALL_PROMPTS, heads=[1, 2, 4, 8], degradation_pool_size=5)  # pools of different sizes
SOURCES = [('rain', 'natural', 'derain', 8), ('blur', 'natural', 'deblur', 8), ('ct', 'medical', 'ct_denoise', 16)]
ALL_TERMS = ('l_pix', 'l_fft', 'l_div', 'l_bal', 'l_con', 'l_con_dom', 'l_align')
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """Per source: train/val folders and descriptions (none for 'blur': its samples use the source mean)."""
    root = tmp_path_factory.mktemp('md')
    descriptions = []
    for i, (name, _, _, bits) in enumerate(SOURCES):
        channels = 1 if bits == 16 else 3
        write_pairs(str(root / name / 'train'), count=4, size=(32, 32), bit_depth=bits, channels=channels, seed=i)
        write_pairs(str(root / name / 'val'), count=1, size=(24, 40), bit_depth=bits, channels=channels, seed=10 + i)
        if name != 'blur':
            path = root / name / 'descriptions.json'
            path.write_text(json.dumps({f'img{k:03d}.png': f'{name} image number {k}' for k in range(4)}))
            descriptions.append((name, str(path)))
    encode_files(descriptions, hash_encoder(16), 'hash').save(str(root / 'texts.pt'))
    return root


def options(root, name, total_iter=6, **train):
    domains, tasks = ['natural', 'medical'], [s[2] for s in SOURCES]
    source = lambda n, d, t, split: dict(name=n, domain=d, task=t, dataroot_gt=str(root / n / split / 'gt'),  # noqa
                                         dataroot_lq=str(root / n / split / 'lq'), io_backend={'type': 'disk'})
    datasets = {'train': dict(name='train', type='DATPRLMultiDomainDataset',
                              datasets=[source(n, d, t, 'train') for n, d, t, _ in SOURCES], domains=domains,
                              tasks=tasks, gt_size=16, use_hflip=True, use_rot=True, batch_size_per_gpu=6,
                              num_worker_per_gpu=0, dataset_enlarge_ratio=50)}
    for n, d, t, _ in SOURCES:
        datasets[f'val_{n}'] = dict(name=f'val_{n}', type='DATPRLMultiDomainDataset', domains=domains, tasks=tasks,
                                    datasets=[source(n, d, t, 'val')])
    train_opt = dict(ema_decay=0.9, optim_g={'type': 'AdamW', 'lr': 2e-4, 'weight_decay': 1e-4},
                     scheduler={'type': 'CosineAnnealingRestartLR', 'periods': [100], 'eta_min': 1e-6},
                     total_iter=total_iter, warmup_iter=-1, pixel_opt={'type': 'L1Loss', 'loss_weight': 1.0})
    train_opt.update(train)
    return dict(name=name, model_type='MultiModalSRv3Model', scale=1, num_gpu='auto', manual_seed=0,
                datasets=datasets, network_g=dict(NETWORK), path={'pretrain_network_g': None, 'resume_state': None},
                train=train_opt,
                val={'val_freq': 3, 'save_img': True, 'suffix': None,
                     'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0}}},
                logger={'print_freq': 1, 'save_checkpoint_freq': 3, 'use_tb_logger': False})


EVERY_LOSS = dict(fft_opt={'type': 'FFTLoss', 'loss_weight': 0.1}, prompt_lr=1e-4, use_amp=True, grad_clip=1.0,
                  use_clip_constraint=True, clip_alignment_weight=1.0, prompt_diversity_weight=1.0,
                  diversity_temperature=0.1, prompt_balance_weight=0.1, stats_update_freq=3, reinit_prompts=True,
                  prompt_contrastive_weight=0.1, enable_prompt_analysis=True, prompt_analysis_freq=6)


def write(path, opt):
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    return str(path)


def train(cwd, option_file, *flags):
    return subprocess.Popen([sys.executable, '-m', 'datprl_arch.train', '-opt', option_file, *flags], cwd=cwd,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process, timeout=120):
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-3000:]
    return out


def test_every_loss_trains_logs_and_validates(tmp_path, data):
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip('bf16 is emulated on this GPU (before compute capability 8.0): training warns instead of '
                    'logging its bf16 autocast')
    opt = options(data, 'every_loss', text_embeddings=str(data / 'texts.pt'), **EVERY_LOSS)
    out = finish(train(tmp_path, write(tmp_path / 'o.yml', opt)))
    iters = re.findall(r'iter:\s+(\d+), lr.*?\] (.*)', out)
    assert [int(i) for i, _ in iters] == list(range(1, 7))
    for _, terms in iters:
        values = dict(re.findall(r'(\w+): (\S+)', terms))
        for term in ALL_TERMS:
            assert term in values and torch.isfinite(torch.tensor(float(values[term]))), (term, terms)
    native_bf16 = torch.cuda.is_available() or bool(cpu_bf16_flags())
    assert ('use_amp: autocast in bf16' in out) == native_bf16 and ('training in float32' in out) != native_bf16
    assert re.search(r'Prompt usage, task pool, iters 1-3: 36 selections', out)  # 3 iters x 6 samples x top-2
    assert re.search(r'Prompt usage, domain pool, iters 4-6: 36 selections', out)
    assert "an image of source 'blur' has no description" in out
    assert 'Validation average over 3 sets' in out and 'domain medical (1 sets)' in out
    exp = tmp_path / 'experiments' / 'every_loss'
    metrics = json.loads((exp / 'metrics.json').read_text())
    assert set(metrics) == {'3', '6'} and set(metrics['6']['domains']) == {'natural', 'medical'}
    assert metrics['6']['average']['psnr'] == pytest.approx(
        sum(s['psnr'] for s in metrics['6']['sets'].values()) / 3)
    analysis = exp / 'prompt_analysis' / '6'
    assert {p.name for p in analysis.iterdir()} >= {'selection.json', 'nmi.json', 'gates.json', 'prompts_2d.json'}
    ct = cv2.imread(str(exp / 'visualization' / 'val_ct' / 'img000_6.png'), cv2.IMREAD_UNCHANGED)
    assert ct.dtype.name == 'uint16' and ct.shape == (24, 40)  # written back as the 16-bit grayscale input
    checkpoint = torch.load(exp / 'models' / 'net_g_latest.pth', weights_only=True)
    assert set(checkpoint) == {'params', 'params_ema', 'network_g'}  # the network options travel with the weights
    assert checkpoint['network_g']['type'] == 'DATPRLRestormer' and isinstance(checkpoint['network_g'], dict)
    assert all(v.is_contiguous() for v in checkpoint['params'].values())  # stored contiguous, trained channels_last
    state = torch.load(exp / 'training_states' / '6.state', weights_only=True)
    assert set(state['objective_stats']) == {'task', 'domain'} and 'scaler' in state


def _model_opt(root, tmp_path, **train):
    """An option dict as BasicSR's parse_options leaves it, for building the model in-process."""
    opt = options(root, 'inproc', **train)
    exp = tmp_path / 'exp'
    opt.update(is_train=True, dist=False, rank=0, world_size=1, num_gpu=0, auto_resume=False)
    opt['path'].update(experiments_root=str(exp), models=str(exp / 'models'), training_states=str(exp / 'ts'),
                       log=str(exp), visualization=str(exp / 'vis'))
    for phase, dataset in opt['datasets'].items():
        dataset.update(phase=phase.split('_')[0], scale=1)
    return opt


@pytest.mark.slow
def test_killed_run_resumes_with_the_saved_state_and_finishes(tmp_path, data):
    killed = EVERY_LOSS | {'use_amp': False, 'text_embeddings': str(data / 'texts.pt')}
    opt = options(data, 'killed', total_iter=100000, **killed)
    opt['logger']['save_checkpoint_freq'] = 4
    opt['val']['val_freq'] = 100000
    process = train(tmp_path, write(tmp_path / 'long.yml', opt))
    states = tmp_path / 'experiments' / 'killed' / 'training_states'
    deadline = time.time() + 120
    while not (states / '4.state').exists():
        assert process.poll() is None and time.time() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()

    saved_iter = max(int(p.stem) for p in states.glob('*.state'))
    saved = torch.load(states / f'{saved_iter}.state', weights_only=True)
    weights_file = tmp_path / 'experiments' / 'killed' / 'models' / f'net_g_{saved_iter}.pth'
    weights = torch.load(weights_file, weights_only=True)
    # what BasicSR's train_pipeline does on resume, in-process, compared tensor by tensor with the files
    resumed_opt = _model_opt(data, tmp_path, **killed)
    resumed_opt['path'].update(pretrain_network_g=str(weights_file))
    model = build_model(resumed_opt)
    model.resume_training(saved)
    for name, tensor in model.net_g.state_dict().items():
        assert torch.equal(tensor, weights['params'][name]), name
    for name, tensor in model.net_g_ema.state_dict().items():
        assert torch.equal(tensor, weights['params_ema'][name]), name
    restored = model.optimizer_g.state_dict()
    for pid, values in saved['optimizers'][0]['state'].items():
        for key, value in values.items():
            assert torch.equal(torch.as_tensor(restored['state'][pid][key]), torch.as_tensor(value)), (pid, key)
    assert model.schedulers[0].state_dict() == saved['schedulers'][0]
    assert [g['lr'] for g in restored['param_groups']] == [g['lr'] for g in saved['optimizers'][0]['param_groups']]
    assert all(torch.equal(model.objectives.tracker.counts[k], v) for k, v in saved['objective_stats'].items())

    opt['train']['total_iter'] = saved_iter + 2
    out = finish(train(tmp_path, write(tmp_path / 'short.yml', opt), '--auto_resume'))
    assert f'Resuming training from epoch: 0, iter: {saved_iter}.' in out
    assert f'Resuming inside epoch 0: its first {saved_iter} batch(es) were used before the save' in out
    assert re.search(rf'iter:\s+{saved_iter + 1}, lr', out) and re.search(rf'iter:\s+{saved_iter + 2}, lr', out)
    assert (tmp_path / 'experiments' / 'killed' / 'models' / 'net_g_latest.pth').exists()


def test_an_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / 'net_g_4.pth')
    atomic_torch_save({'params': {'w': torch.ones(3)}}, path)

    def dies_midway(obj, f, *args, **kwargs):
        with open(f, 'wb') as handle:
            handle.write(b'PK\x03\x04 partial')
        raise KeyboardInterrupt('killed while saving')

    monkeypatch.setattr(torch, 'save', dies_midway)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({'params': {'w': torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)['params']['w'], torch.ones(3))
    assert os.listdir(tmp_path) == ['net_g_4.pth']


def _batch(model_opt, nan=False):
    lq = torch.rand(6, 3, 16, 16)
    if nan:
        lq[0, 0, 0, 0] = float('nan')
    return {'lq': lq, 'gt': torch.rand(6, 3, 16, 16), 'source': torch.tensor([0, 0, 1, 1, 2, 2]),
            'domain': torch.tensor([0, 0, 0, 0, 1, 1]), 'task': torch.tensor([0, 0, 1, 1, 2, 2]),
            'gt_path': [f'/x/img00{i % 4}.png' for i in range(6)],
            'source_name': ['rain'] * 2 + ['blur'] * 2 + ['ct'] * 2}


def test_nonfinite_losses_skip_steps_then_stop(tmp_path, data, caplog):
    opt = _model_opt(data, tmp_path, max_nonfinite_steps=3, prompt_contrastive_weight=0.1)
    model = build_model(opt)
    before = {k: v.clone() for k, v in model.net_g.state_dict().items()}
    model.feed_data(_batch(opt, nan=True))
    model.optimize_parameters(1)
    model.optimize_parameters(2)
    assert all(torch.equal(before[k], v) for k, v in model.net_g.state_dict().items())
    with pytest.raises(RuntimeError, match=r"3 consecutive non-finite steps \(last: non-finite loss \['l_pix'.*iter 3"):
        model.optimize_parameters(3)
    model.nonfinite_steps = 0
    model.feed_data(_batch(opt))
    model.optimize_parameters(4)
    assert model.nonfinite_steps == 0
    assert not all(torch.equal(before[k], v) for k, v in model.net_g.state_dict().items())


def test_dead_parameters_are_frozen_and_prompt_lr_groups(tmp_path, data):
    model = build_model(_model_opt(data, tmp_path, prompt_lr=1e-5, freeze=['encoder_level1']))
    net = model.net_g
    assert not net.latent_blocks[0].cross_attn_q.weight.requires_grad
    assert not net.encoder_level1[0].attn.qkv.weight.requires_grad
    assert net.latent_blocks[0].cross_attn_v.weight.requires_grad
    groups = model.optimizer_g.param_groups
    assert [(g['name'], g['lr']) for g in groups] == [('backbone', 2e-4), ('prompts', 1e-5)]
    optimized = {id(p) for g in groups for p in g['params']}
    assert optimized == {id(p) for p in net.parameters() if p.requires_grad}


def test_unknown_train_key_lists_the_accepted_ones(tmp_path, data):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['prompt_diversty_weight'\].*'prompt_diversity_weight'"):
        build_model(_model_opt(data, tmp_path, prompt_diversty_weight=1.0))


def test_ema_copies_buffers(tmp_path, data):
    model = build_model(_model_opt(data, tmp_path))
    model.net_g.register_buffer('running', torch.ones(2))
    model.net_g_ema.register_buffer('running', torch.zeros(2))
    model.model_ema(0.5)
    assert torch.equal(model.net_g_ema.running, torch.ones(2))


def test_official_6task_train_section_is_accepted(tmp_path, data):
    official = OrderedDict(
        ema_decay=0, optim_g={'type': 'Adam', 'lr': 4e-4, 'weight_decay': 0, 'betas': [0.9, 0.99]},
        scheduler={'type': 'CosineAnnealingRestartLR', 'periods': [1000000], 'restart_weights': [1],
                   'eta_min': 1e-6},
        total_iter=1000000, warmup_iter=0, pixel_opt={'type': 'L1Loss', 'loss_weight': 1, 'reduction': 'mean'},
        fft_opt={'type': 'FFTLoss', 'loss_weight': 0.1}, prompt_lr=4e-4, use_amp=True, grad_clip=1.0,
        use_clip_constraint=True, clip_model='RN50', clip_alignment_weight=1.0,
        text_description_paths=[str(data / 'rain' / 'descriptions.json'), str(data / 'rain' / 'descriptions.json'),
                                str(data / 'ct' / 'descriptions.json')],
        prompt_diversity_weight=1.0, diversity_temperature=0.1, prompt_balance_weight=0.1, stats_update_freq=5000,
        reinit_prompts=False, prompt_contrastive_weight=0.1, enable_prompt_analysis=False,
        prompt_analysis_freq=50000, prompt_analysis_save_path='./prompt_analysis')
    opt = _model_opt(data, tmp_path)
    opt['train'] = official
    with pytest.raises(OptionFileError, match=r'use_clip_constraint: true, but the domain-prior constraint cannot be '
                       r'applied: text_description_paths is set but no encoder'):  # no local CLIP weights
        build_model(opt)
    opt['train'] = dict(official, use_clip_constraint=False)  # turned off explicitly: trains without it
    model = build_model(opt)
    assert model.objectives.alignment is None and model.objectives.diversity is not None
    opt['train'] = dict(official, text_encoder='hash')
    assert build_model(opt).objectives.alignment is not None


def _spatial_conv_weights(net):
    return [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]


def test_cpu_training_runs_channels_last(tmp_path, data, monkeypatch):
    """On the CPU the network, its EMA and the inputs are channels_last (oneDNN's layout), in float32 and in bf16;
    a bf16 step runs and updates the weights."""
    monkeypatch.setattr(precision, 'cpu_bf16_flags', lambda: ('avx512_bf16',))
    for use_amp in (False, True):
        opt = _model_opt(data, tmp_path, use_amp=use_amp)
        model = build_model(opt)
        assert model.memory_format == torch.channels_last
        for net in (model.net_g, model.net_g_ema):
            assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _spatial_conv_weights(net))
    before = [w.detach().clone() for w in _spatial_conv_weights(model.net_g)]
    model.feed_data(_batch(opt))
    assert model.lq.is_contiguous(memory_format=torch.channels_last)
    model.optimize_parameters(1)
    assert any(not torch.equal(a, b) for a, b in zip(before, _spatial_conv_weights(model.net_g)))
    os.makedirs(opt['path']['models'])
    model.save_network(model.net_g, 'net_g', -1)
    saved = torch.load(os.path.join(opt['path']['models'], 'net_g_latest.pth'), weights_only=True)['params']
    assert all(v.is_contiguous() for v in saved.values())  # the checkpoint does not carry the run's layout


def test_unknown_amp_dtype_is_an_error(tmp_path, data):
    with pytest.raises(ValueError, match=r"train.amp_dtype must be one of \['bf16', 'fp16'\], got 'int8'"):
        build_model(_model_opt(data, tmp_path, use_amp=True, amp_dtype='int8'))


def test_unknown_text_encoder_is_an_error(tmp_path, data):
    paths = [str(data / 'rain' / 'descriptions.json')] * 3
    with pytest.raises(ValueError, match=r"train.text_encoder must be one of \(None, 'clip', 'hash'\), got 'hsah'"):
        build_model(_model_opt(data, tmp_path, use_clip_constraint=True, text_description_paths=paths,
                               text_encoder='hsah'))


def test_dataparallel_is_refused_for_prompted_networks(tmp_path, data):
    opt = _model_opt(data, tmp_path)
    opt['num_gpu'] = 2
    with pytest.raises(ValueError, match=r'num_gpu: 2 without a launcher would use DataParallel.*torchrun'):
        build_model(opt)
