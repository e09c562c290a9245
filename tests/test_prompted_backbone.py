"""PromptedBackbone: DATPRL's prompts on registered backbones (SwinIR, RRDBNet, EDSR, RCAN, our Restormer) through
forward hooks. Tiny configurations; one end-to-end run per feature layout through BasicSR's runner."""
import copy
import json
import re

import pytest
import torch
from torch.nn import functional as F

import datprl_arch  # noqa: F401  (registration)
from basicsr.archs import build_network
from basicsr.models import build_model
from datprl_arch.archs.prompt import PromptedBlock, dead_parameter_names, prompt_parameter_names
from datprl_arch.archs.prompt.taps import token_grid
from datprl_arch.errors import NetworkOptionError
from datprl_arch.inference.restore import Restorer
from datprl_arch.inference.tiling import plan_tiles
from datprl_arch.utils.checkpoint import CheckpointError

from test_training import EVERY_LOSS, _batch, _model_opt, data, finish, options, train, write  # noqa: F401

PROBE = 16
#: name -> (backbone options, taps, inject_after): every family of the issue, as small as it goes.
BACKBONES = {
    'SwinIR': (dict(type='SwinIR', upscale=1, upsampler='', img_size=PROBE, window_size=4, embed_dim=12,
                    depths=[1, 1], num_heads=[2, 2], mlp_ratio=2),
               {'domain': 'conv_first', 'task': 'layers.0'}, ['layers.1', 'conv_after_body']),  # tokens and a map
    'RRDBNet': (dict(type='RRDBNet', num_in_ch=3, num_out_ch=3, scale=1, num_feat=8, num_block=2, num_grow_ch=4),
                {'domain': 'conv_first', 'task': 'body.0'}, ['body.1']),
    'EDSR': (dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=8, num_block=2, upscale=1),
             {'domain': 'conv_first', 'task': 'body.0'}, ['body.1']),
    'RCAN': (dict(type='RCAN', num_in_ch=3, num_out_ch=3, num_feat=8, num_group=2, num_block=1, squeeze_factor=4,
                  upscale=1), {'domain': 'conv_first', 'task': 'body.0'}, ['body.1']),
    'Restormer': (dict(type='Restormer', dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 2, 2]),
                  {'domain': 'patch_embed', 'task': 'down3_4'}, [r'latent\.\d+', 'decoder_level1.0']),
}
NAMES = list(BACKBONES)
IMAGE = (2, 3, 16, 24)


def options_for(name, **extra):
    backbone, taps, inject = BACKBONES[name]
    return {'type': 'PromptedBackbone', 'backbone': dict(backbone), 'taps': dict(taps), 'inject_after': list(inject),
            'probe_size': PROBE, **extra}


def wrapped(name, seed=0, **extra):
    torch.manual_seed(seed)
    return build_network(options_for(name, **extra))


def bare(name, seed=0):
    torch.manual_seed(seed)
    return build_network(dict(BACKBONES[name][0]))


def image(seed=1):
    return torch.rand(IMAGE, generator=torch.Generator().manual_seed(seed))


def groups_with_gradient(net):
    """Top-level parts of the prompt system (pools, queries, composition, each fusion) that received a gradient."""
    return {'.'.join(n.split('.')[:2]) if n.startswith('fusions') else n.split('.')[0]
            for n, p in net.named_parameters() if not n.startswith('backbone.') and p.grad is not None
            and p.grad.abs().sum() > 0}


PROMPT_PARTS = {'degradation_prompt_pool', 'domain_prompt_pool', 'degradation_mapper', 'domain_mapper',
                'prompt_cross_attention', 'prompt_fusion_norm', 'prompt_fusion_ffn'}


# ------------------------------------------------------------------------------------------------ every backbone
@pytest.mark.parametrize('name', NAMES)
def test_identity_at_init_keys_intact_and_backbone_checkpoint_loads(name, tmp_path):
    plain, net = bare(name, seed=3).eval(), wrapped(name).eval()
    backbone_keys = {k[len('backbone.'):] for k in net.state_dict() if k.startswith('backbone.')}
    assert backbone_keys == set(plain.state_dict())
    others = {k for k, _ in net.named_parameters() if not k.startswith('backbone.')}
    assert others and others == prompt_parameter_names(net)  # everything else is the prompt system
    path = tmp_path / 'plain.pth'
    torch.save({'params': plain.state_dict()}, path)  # a BasicSR model-zoo file
    prompts = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith('backbone.')}
    net.load_backbone(str(path))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in prompts.items())  # the prompts start fresh
    x = image()
    with torch.no_grad():
        expected, out = plain(x), net(x)
    assert out.shape == x.shape  # scale 1
    assert torch.equal(out, expected)  # gate_init identity: exactly the bare backbone
    assert net.prompt_state.prompt.shape == (2, 64)  # ... yet the prompt was retrieved and injected
    torch.save(plain.state_dict(), path)  # a bare state_dict loads too
    net.load_backbone(str(path))


@pytest.mark.parametrize('name', NAMES)
def test_gradients_reach_pools_and_fusions(name):
    net = wrapped(name, fusion={'gate_init': 0.5})
    net(image()).square().mean().backward()
    fusions = {f'fusions.{i}' for i in range(len(net.fusions))}
    assert groups_with_gradient(net) == PROMPT_PARTS | fusions
    assert net.fusions[0].feature_weight.grad.abs() > 0


@pytest.mark.parametrize('name', ['SwinIR', 'EDSR'])
def test_identity_init_opens_after_one_step(name):
    net = wrapped(name)
    net(image()).square().mean().backward()
    assert groups_with_gradient(net) == {f'fusions.{i}' for i in range(len(net.fusions))}  # zero last layers
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    net.zero_grad()
    net(image()).square().mean().backward()
    assert PROMPT_PARTS <= groups_with_gradient(net)


@pytest.mark.parametrize('name', NAMES)
def test_deepcopy_state_dict_round_trip_and_compile(name):
    net = wrapped(name, fusion={'gate_init': 0.5})
    net(image()).mean().backward()  # the last retrieval holds autograd history: copies must skip it
    twin = copy.deepcopy(net).eval()
    net.eval()
    net.prompt_state = None
    x = image(2)
    with torch.no_grad():
        out = twin(x)
        assert twin.prompt_state is not None and net.prompt_state is None  # the copy's hooks feed the copy
        assert torch.equal(out, net(x))
        fresh = wrapped(name, seed=5, fusion={'gate_init': 0.5}).eval()
        fresh.load_state_dict(net.state_dict())
        assert torch.equal(fresh(x), out)
        compiled = torch.compile(fresh, backend='eager')  # dynamo traces the hooks
        assert torch.allclose(compiled(x), out, atol=1e-6)


def test_token_taps_read_swinir_x_size_and_fall_back_to_the_image():
    tokens = torch.zeros(1, 12, 4)
    assert token_grid(tokens, (tokens, (3, 4)), (99, 99)) == (3, 4)  # SwinIR's x_size argument
    assert token_grid(tokens, (tokens,), (6, 8)) == (3, 4)  # image 6x8 at stride 2
    with pytest.raises(NetworkOptionError, match='cannot tell the grid of 12 tokens from a 5x7 input'):
        token_grid(tokens, (tokens,), (5, 7))
    net = wrapped('SwinIR')
    assert net.tap_layouts == {'domain': 'map', 'task': 'tokens'}
    assert [f.layout for f in net.fusions] == ['tokens', 'map']


def test_prompt_options_fusion_modes_and_lean():
    only_task = wrapped('EDSR', prompt={'domain_pool': None}, taps={'task': 'body.0'})
    assert set(only_task.prompt_pools()) == {'task'} and only_task.prompt_taps == ('task',)
    for method in ('concat', 'adaptive_modulation'):
        net = wrapped('SwinIR', fusion={'method': method}).eval()
        plain = bare('SwinIR', seed=3).eval()
        net.backbone.load_state_dict(plain.state_dict())
        x = image()
        with torch.no_grad():
            assert torch.allclose(net(x), plain(x), atol=1e-6), method  # identity at init in every mode
    full = wrapped('EDSR', prompt={'lean': False})
    dead = dead_parameter_names(full)
    assert dead == {f'fusions.0.{m}.{p}' for m in ('cross_attn_q', 'cross_attn_k') for p in ('weight', 'bias')}
    assert not any('cross_attn_q' in n for n, _ in wrapped('EDSR').named_parameters())  # lean by default
    pools = wrapped('EDSR', prompt={'task_pool': {'size': 5, 'dim': 16, 'top_k': 2, 'query_grid': [2, 1]},
                                    'domain_pool': {'size': 3, 'dim': 16}})
    assert pools.prompt_pools()['task'].prompt_keys.shape == (5, 16) and pools.prompt_width == 16
    assert pools.degradation_mapper.mapper[0].output_size == 2


# ------------------------------------------------------------------------------------------------ construction errors
@pytest.mark.parametrize('change, message', [
    (dict(backbone=dict(type='MSRResNet', num_feat=8, num_block=1)),
     r'MSRResNet maps a \[2, 3, 16, 16\] input to \[2, 3, 64, 64\]; PromptedBackbone restores at scale 1'),
    (dict(taps={'domain': 'conv_firs', 'task': 'body.0'}),
     r"taps.domain: 'conv_firs' names no module that runs in the forward; usable modules: conv_first, body.0, body.1"),
    (dict(taps={'domain': 'conv_first', 'task': 'body.1'}, inject_after=['body.0']),
     r"taps.task: 'body.1' finishes after the injection point 'body.0': the prompt must be composed before"),
    (dict(inject_after=['bdy.*']), r"inject_after: 'bdy.\*' names no module .* matches none as a regular expression"),
    (dict(inject_after=['body.(']), r"inject_after: 'body.\(' .* is not a valid regular expression"),
    (dict(taps={'task': 'body.0'}), r"taps: 'domain' is missing: name the module whose output the domain query"),
    (dict(prompt={'task_pool': {'size': 2, 'top_k': 3}}), r'prompt.task_pool.top_k must lie in \[1, .*size=2\]'),
    (dict(prompt={'task_pool': {'sise': 2}}), r"prompt.task_pool: unknown key 'sise' \(accepted: size, dim"),
    (dict(fusion={'gate_init': 0.3}), r"gate_init must be one of \('0.5', 'identity'\), got 0.3"),
    (dict(backbone=dict(type='Nope')), r"backbone.type 'Nope' is not a registered network"),
    (dict(taps={'domain': 'conv_first', 'task': 'body.0', 'depth': 'body.1'}), r"taps: unknown tap 'depth'"),
])
def test_construction_errors_name_the_problem(change, message):
    with pytest.raises(NetworkOptionError, match=message):
        build_network({**options_for('EDSR'), **change})


def test_backbone_checkpoint_of_another_network_is_refused(tmp_path):
    path = tmp_path / 'rcan.pth'
    torch.save({'params': bare('RCAN').state_dict()}, path)
    with pytest.raises(CheckpointError, match=r'does not fit EDSR: \d+ missing keys'):
        wrapped('EDSR').load_backbone(str(path))


# ------------------------------------------------------------------------------------------------ the package around it
def test_every_tile_gets_the_whole_image_prompt():
    net = wrapped('SwinIR', fusion={'gate_init': 0.5}).eval()
    x = torch.rand(1, 3, 24, 32)
    seen = []
    for fusion in net.fusions:
        fusion.register_forward_pre_hook(lambda module, args: seen.append(args[1].detach().clone()))
    with torch.no_grad():
        whole = net.compute_prompt(x)
        seen.clear()
        out, _ = Restorer(net, torch.device('cpu'), tile=16, overlap=8)(x)
    assert out.shape == x.shape and len(seen) == len(plan_tiles(24, 32, 16, 8)) * len(net.fusions)
    assert all(torch.equal(p, whole) for p in seen)


def test_model_freezes_the_backbone_for_prompt_tuning(tmp_path, data):  # noqa: F811
    opt = _model_opt(data, tmp_path, prompt_lr=1e-3, freeze=['backbone'], prompt_contrastive_weight=0.1,
                     prompt_diversity_weight=1.0, prompt_balance_weight=0.1)
    opt['network_g'] = options_for('EDSR')
    model = build_model(opt)
    net = model.net_g
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == prompt_parameter_names(net)
    assert [g['name'] for g in model.optimizer_g.param_groups] == ['prompts']
    before = {k: v.clone() for k, v in net.state_dict().items()}
    model.feed_data(_batch(opt))
    model.optimize_parameters(1)
    assert {'l_pix', 'l_div', 'l_bal', 'l_con', 'l_con_dom'} <= set(model.log_dict)
    changed = {k for k, v in net.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and not any(k.startswith('backbone.') for k in changed)
    assert model.objectives.pools == ['task', 'domain']


@pytest.mark.slow
@pytest.mark.parametrize('name', ['SwinIR', 'EDSR'])
def test_trains_through_basicsr_runner_from_a_backbone_checkpoint(name, tmp_path, data):  # noqa: F811
    checkpoint = tmp_path / 'plain.pth'
    torch.save({'params_ema': bare(name, seed=3).state_dict()}, checkpoint)
    opt = options(data, f'wrapped_{name}', total_iter=4, text_embeddings=str(data / 'texts.pt'), **EVERY_LOSS)
    opt['network_g'] = options_for(name)
    opt['path']['pretrain_network_backbone'] = str(checkpoint)
    opt['train']['prompt_analysis_freq'] = 3
    out = finish(train(tmp_path, write(tmp_path / 'o.yml', opt)))
    assert f'Loading the backbone of PromptedBackbone from {checkpoint}' in out
    iters = re.findall(r'iter:\s+(\d+), lr.*?\] (.*)', out)
    assert [int(i) for i, _ in iters] == [1, 2, 3, 4]
    assert all(term in iters[-1][1] for term in ('l_pix', 'l_div', 'l_bal', 'l_con', 'l_con_dom', 'l_align'))
    assert re.search(r'Prompt usage, domain pool, iters 1-3: \d+ selections', out)
    analysis = tmp_path / 'experiments' / f'wrapped_{name}' / 'prompt_analysis' / '3'
    assert set(json.loads((analysis / 'gates.json').read_text())) == {f'fusions.{i}' for i in range(len(
        BACKBONES[name][2]))}
    assert set(json.loads((analysis / 'nmi.json').read_text())) == {'task_pool', 'domain_pool'}
    saved = torch.load(tmp_path / 'experiments' / f'wrapped_{name}' / 'models' / 'net_g_latest.pth',
                       weights_only=True)
    assert saved['network_g']['type'] == 'PromptedBackbone'
    assert saved['network_g']['backbone']['type'] == name
    rebuilt = build_network(dict(saved['network_g']))
    rebuilt.load_state_dict(saved['params'])  # the checkpoint rebuilds without an option file
    assert F.l1_loss(rebuilt.eval()(image()), image()).isfinite()


def test_padding_lets_swinir_take_any_size():
    plain, net = bare('SwinIR', seed=3).eval(), wrapped('SwinIR', pad_multiple=4).eval()
    net.backbone.load_state_dict(plain.state_dict())
    x = torch.rand(1, 3, 18, 23)
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            plain(x)  # BasicSR's SwinIR takes only multiples of its window
        out = net(x)
        padded = F.pad(x, (0, 1, 0, 2), mode='reflect')
        assert out.shape == x.shape and torch.equal(out, plain(padded)[..., :18, :23])


def test_a_backbone_with_its_own_prompts_is_refused():
    from networks import TINY
    with pytest.raises(NetworkOptionError, match=r'backbone DATPRLRestormer has a prompt system of its own: wrap its '
                                                 r'prompt-free form \(use_prompt: false\)'):
        build_network({'type': 'PromptedBackbone', 'backbone': dict(TINY), 'taps': {}, 'inject_after': ['output'],
                       'prompt': {'type': 'AdaptivePrompt'}})
    plain = build_network({'type': 'PromptedBackbone', 'backbone': dict(TINY, use_prompt=False), 'taps': {},
                           'inject_after': ['latent_blocks'], 'prompt': {'type': 'AdaptivePrompt'}, 'probe_size': 16})
    assert plain.backbone.prompt_width is None


def test_gate_values_are_reported_for_fusions():
    from datprl_arch.models.analysis import gate_values
    net = wrapped('RRDBNet')
    assert set(gate_values(net)) == {'fusions.0'} and all(isinstance(m, PromptedBlock) for m in net.fusions)


def test_bench_measures_the_option_files_networks():
    from datprl_arch.bench import WRAPPED
    from datprl_arch.options import load_option_file
    for name, network in WRAPPED.items():
        assert load_option_file(f'options/train/md_mini_{name}.yml')['network_g'] == network, name
        assert load_option_file(f'options/train/md_mini_{name}_plain.yml')['network_g'] == network['backbone'], name


@pytest.mark.slow
def test_two_cpu_ranks_train_a_wrapped_backbone_identically(tmp_path):
    from test_distributed import check_ranks, ddp_options, torchrun
    opt = ddp_options(tmp_path / 'data')
    opt['network_g'] = options_for('SwinIR')
    opt['train'].update(prompt_contrastive_weight=0.1, prompt_diversity_weight=1.0)
    root = tmp_path / 'root'
    root.mkdir()
    _, records, weights = torchrun(tmp_path / 'run', write(tmp_path / 'train.yml', opt), root)
    check_ranks(records, weights, [1, 2, 3, 4], root / 'experiments' / 'ddp')
    assert any(k.startswith('fusions.') for k in weights[0]) and any(k.startswith('backbone.') for k in weights[0])
