"""DATPRL networks: exact equivalence with the official code, checkpoint keys, registry, gradients, modes."""
import glob
import inspect
import os

import pytest
import torch
import yaml

import datprl_arch  # noqa: F401  (registers the networks; applies the basicsr compatibility fixes)
from basicsr.archs import build_network
from basicsr.utils.registry import ARCH_REGISTRY
from datprl_arch.archs.restormer_arch import ChannelAttention, GatedFeedForward
from datprl_arch.bench import CDD11, SIX_TASK

from networks import TINY, TINY_NAF

DATA = os.path.join(os.path.dirname(__file__), 'data')
GOLDEN = sorted(glob.glob(os.path.join(DATA, '*.pt')))
TOLERANCE = 1e-6  # the README promises < 1e-6; measured up to 4.8e-7


def load_golden(path):
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.mark.parametrize('literal', [False, True], ids=['fast', 'literal'])
@pytest.mark.parametrize('path', GOLDEN, ids=os.path.basename)
def test_golden_outputs(path, literal):
    golden = load_golden(path)
    net = build_network({'type': golden['arch'], **golden['config'], 'literal': literal}).eval()
    net.load_state_dict(golden['state_dict'], strict=True)
    assert list(net.state_dict()) == list(golden['state_dict'])
    with torch.no_grad():
        out = net(golden['input'])
    assert out.shape == golden['output'].shape
    assert (out - golden['output']).abs().max().item() < TOLERANCE


def test_six_golden_files_present():
    assert len(GOLDEN) == 6


@pytest.mark.parametrize('path', [p for p in GOLDEN if 'restormer_plain' not in p], ids=os.path.basename)
def test_lean_network_loads_official_weights_and_matches(path):
    golden = load_golden(path)
    net = build_network({'type': golden['arch'], **golden['config'], 'lean': True}).eval()
    net.load_state_dict(golden['state_dict'], strict=True)
    assert not any('cross_attn_q' in k or 'cross_attn_k' in k for k in net.state_dict())
    with torch.no_grad():
        assert (net(golden['input']) - golden['output']).abs().max().item() < TOLERANCE


def read_key_list(name):
    with open(os.path.join(DATA, name)) as f:
        return [tuple(line.strip().split(' ')) for line in f if line.strip()]


@pytest.mark.parametrize('config,listing,params', [(SIX_TASK, 'state_dict_6t.txt', 53_133_552),
                                                   (CDD11, 'state_dict_cdd11.txt', 42_563_115)], ids=['6t', 'cdd11'])
def test_full_size_keys_and_shapes(config, listing, params):
    net = build_network(dict(config))
    ours = [(k, '[' + ','.join(map(str, v.shape)) + ']') for k, v in net.state_dict().items()]
    assert ours == read_key_list(listing)
    assert sum(p.numel() for p in net.parameters()) == params


@pytest.mark.parametrize('config,option_file', [(SIX_TASK, 'datprl_6t.yml'), (CDD11, 'datprl_cdd11.yml')],
                         ids=['6t', 'cdd11'])
def test_benchmarked_configurations_are_the_official_option_files_networks(config, option_file):
    with open(os.path.join(os.path.dirname(os.path.dirname(DATA)), 'options', 'train', option_file)) as f:
        official = yaml.safe_load(f)['network_g']

    def arguments(options):
        cls = ARCH_REGISTRY.get(options['type'])
        bound = inspect.signature(cls).bind(**{k: v for k, v in options.items() if k != 'type'})
        bound.apply_defaults()
        return cls, {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in bound.arguments.items()}

    assert arguments(config) == arguments(official)


def test_lean_full_size_drops_exactly_the_dead_parameters():
    lean = build_network(dict(SIX_TASK, lean=True))
    assert sum(p.numel() for p in lean.parameters()) == 53_133_552 - 9_089_536


NAMES = ['DATPRLRestormer', 'DualPromptRestormerv3', 'DATPRLRestormerTaskPool',
         'DualPromptRestormerv3_only_task_prompt', 'DATPRLNAFNet', 'DualPromptNAFNetv3', 'PaddedRestormer', 'Restormer']


@pytest.mark.parametrize('name', NAMES)
def test_every_name_resolves_through_basicsr(name):
    assert name in ARCH_REGISTRY
    small = dict(dim=8, enc_blk_nums=[1, 1, 1], middle_blk_num=1, dec_blk_nums=[1, 1, 1], refine_blk_num=1,
                 degradation_prompt_dim=16, domain_prompt_dim=16)
    if 'NAF' in name:
        small = dict(width=8, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1], domain_prompt_dim=16,
                     degradation_prompt_dim=16)
    elif 'Restormer' == name or 'Padded' in name:
        small = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1)
    elif 'TaskPool' in name or 'only_task' in name:
        small.pop('domain_prompt_dim')
    net = build_network({'type': name, **small}).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, 16, 16)).shape == (1, 3, 16, 16)


def test_aliases_are_the_same_classes():
    assert ARCH_REGISTRY.get('DualPromptRestormerv3') is ARCH_REGISTRY.get('DATPRLRestormer')
    assert ARCH_REGISTRY.get('DualPromptNAFNetv3') is ARCH_REGISTRY.get('DATPRLNAFNet')


def test_registering_twice_is_harmless_and_a_clash_is_explained():
    from datprl_arch.utils.registry import register
    cls = ARCH_REGISTRY.get('DATPRLRestormer')
    register(ARCH_REGISTRY, aliases=('DualPromptRestormerv3',))(cls)
    assert ARCH_REGISTRY.get('DualPromptRestormerv3') is cls

    class SwinIR(torch.nn.Module):  # basicsr's own SwinIR holds this name
        pass

    with pytest.raises(KeyError, match='basicsr.archs.swinir_arch.SwinIR'):
        register(ARCH_REGISTRY)(SwinIR)


def dead(name):
    """Parameters that cannot affect the output: single-key attention queries/keys."""
    return 'cross_attn_q' in name or 'cross_attn_k' in name


@pytest.mark.parametrize('config', [TINY, TINY_NAF], ids=['restormer', 'nafnet'])
def test_gradients_reach_live_parameters_only(config):
    torch.manual_seed(0)
    net = build_network(dict(config)).train()
    with torch.no_grad():  # NAF's zero-initialised residual scales would block every gradient behind them
        for name, p in net.named_parameters():
            if name.endswith(('beta', 'gamma')):
                p.normal_()
    out = net(torch.rand(4, 3, 19, 23))
    (out - torch.rand_like(out)).abs().mean().backward()
    state = net.prompt_state
    for name, p in net.named_parameters():
        if dead(name):
            assert p.grad is None or not p.grad.any(), name
        elif name.endswith('in_proj_weight') or name.endswith('in_proj_bias'):
            e = p.shape[0] // 3
            assert not p.grad[:2 * e].any() and p.grad[2 * e:].abs().sum() > 0, name
        elif name.endswith(('prompt_keys', 'prompt_values')):
            pool = state.domain if name.startswith('domain') else state.task
            selected = torch.zeros(p.shape[0], dtype=torch.bool)
            selected[pool.indices.flatten()] = True
            touched = p.grad.flatten(1).abs().sum(1) > 0
            assert torch.equal(touched, selected), name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_eval_is_deterministic_and_independent_of_batch_and_memory_format():
    """Also the same output channels_last (the CPU's layout) as contiguous, in float32."""
    torch.manual_seed(0)
    net = build_network(dict(TINY)).eval()
    x = torch.rand(3, 3, 21, 17)
    with torch.no_grad():
        full = net(x)
        again = net(x)
        single = torch.cat([net(x[i:i + 1]) for i in range(3)])
        channels_last = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(full, again)
    assert (full - single).abs().max() < 1e-5
    assert (full - channels_last).abs().max().item() < TOLERANCE


def test_train_mode_is_stochastic():
    torch.manual_seed(0)
    net = build_network(dict(TINY)).train()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert not torch.equal(net(x), net(x))


@pytest.mark.parametrize('size', [(1, 1), (7, 5), (8, 8), (33, 20)])
@pytest.mark.parametrize('config', [TINY, TINY_NAF], ids=['restormer', 'nafnet'])
def test_odd_sizes_keep_their_shape(config, size):
    net = build_network(dict(config)).eval()
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        assert net(x).shape == x.shape


def test_zero_padding_matches_explicit_padding():
    torch.manual_seed(0)
    net = build_network(dict(TINY)).eval()
    x = torch.rand(1, 3, 13, 10)
    padded = torch.nn.functional.pad(x, (0, 6, 0, 3))
    with torch.no_grad():
        assert torch.equal(net(x), net(padded)[..., :13, :10])


def test_pad_multiple_pads_further_and_crops_back():
    torch.manual_seed(0)
    net = build_network(dict(TINY, pad_multiple=32)).eval()
    x = torch.rand(1, 3, 13, 10)
    with torch.no_grad():
        out = net(x)
        assert out.shape == x.shape
        assert torch.equal(out, net(torch.nn.functional.pad(x, (0, 22, 0, 19)))[..., :13, :10])


def test_reflect_padding_is_opt_in_and_differs():
    torch.manual_seed(0)
    zero = build_network(dict(TINY)).eval()
    reflect = build_network(dict(TINY, pad_mode='reflect')).eval()
    reflect.load_state_dict(zero.state_dict())
    x = torch.rand(1, 3, 13, 10)
    with torch.no_grad():
        assert not torch.allclose(zero(x), reflect(x))


def test_prompt_state_exposes_the_retrieval():
    net = build_network(dict(TINY)).eval()
    with torch.no_grad():
        net(torch.rand(2, 3, 16, 16))
    state = net.prompt_state
    assert state.task.indices.shape == (2, 2) and state.domain.indices.shape == (2, 3)
    assert state.task.logits.shape == (2, 7) and state.domain.logits.shape == (2, 6)
    assert state.task_query.shape == state.domain_query.shape == (2, 32)
    assert state.prompt.shape == (2, 32)
    assert torch.allclose(state.task.weights.sum(-1), torch.ones(2))


def test_pool_similarities_ranking_and_logits_are_float32_under_autocast():
    from datprl_arch.archs.prompt.pool import PromptPool
    torch.manual_seed(0)
    pool = PromptPool(pool_size=6, prompt_dim=16, top_k=3, value_num_tokens=2).eval()
    query = torch.randn(5, 16)
    with torch.no_grad():
        reference = pool(query)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            mixed = pool(query)
    assert mixed.logits.dtype == mixed.weights.dtype == torch.float32
    assert torch.equal(mixed.logits, reference.logits) and torch.equal(mixed.indices, reference.indices)
    net = build_network(dict(TINY)).train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        net(torch.rand(2, 3, 16, 16))
    assert net.prompt_state.task.logits.dtype == net.prompt_state.domain.logits.dtype == torch.float32


@pytest.mark.parametrize('change,message', [
    (dict(prompt_fusion_method='sum'), "prompt_fusion_method must be one of"),
    (dict(fusion_method='add'), "fusion_method must be one of"),
    (dict(domain_prompt_dim=16), 'needs domain_prompt_dim == degradation_prompt_dim'),
    (dict(LayerNorm_type='Batch'), 'LayerNorm_type must be one of'),
    (dict(degradation_top_k=9), r'degradation_top_k must lie in \[1, degradation_pool_size=7\], got 9'),
    (dict(domain_pool_size=0, domain_top_k=0), 'domain_pool_size must be a positive integer'),
    (dict(value_num_tokens=0), 'value_num_tokens must be a positive integer'),
    (dict(domain_prompt_dim=20, degradation_prompt_dim=20), 'divisible by its 8 attention heads, got 20'),
    (dict(heads=[1, 3, 4, 8]), 'cannot be split into 3 attention heads'),
    (dict(pad_mode='wrap'), 'pad_mode must be one of'),
    (dict(pad_multiple=12), 'pad_multiple must be a multiple of 8'),
    (dict(lean=True, literal=True), 'choose one'),
])
def test_bad_configurations_fail_at_construction(change, message):
    with pytest.raises(ValueError, match=message):
        build_network(dict(TINY, **change))


@pytest.mark.parametrize('config', [TINY, TINY_NAF], ids=['restormer', 'nafnet'])
@pytest.mark.parametrize('change', [dict(prompt_fusion_method='sum'), dict(fusion_method='add'),
                                    dict(degradation_top_k=9), dict(lean=True, literal=True)])
def test_a_bad_prompt_configuration_fails_before_any_layer_is_built(config, change, monkeypatch):
    def built(*args, **kwargs):
        raise AssertionError('a layer was built before the prompt configuration was checked')

    monkeypatch.setattr(torch.nn.Conv2d, '__init__', built)
    with pytest.raises(ValueError):
        build_network(dict(config, **change))


def test_prompt_config_is_frozen_and_computes_the_prompt_width():
    from dataclasses import FrozenInstanceError

    from datprl_arch.archs.prompt import PoolSpec, PromptConfig
    task, domain = PoolSpec(7, 32, 2), PoolSpec(6, 16, 3)
    assert PromptConfig(task, None, 2).width == 32
    assert PromptConfig(task, PoolSpec(6, 32, 3), 2, 'cross_attention').width == 32
    assert PromptConfig(task, domain, 2, 'concat').width == 48
    with pytest.raises(FrozenInstanceError):
        PromptConfig(task, None, 2).fusion = 'concat'
    for config in (TINY, dict(TINY, prompt_fusion_method='concat', domain_prompt_dim=16)):
        net = build_network(dict(config)).eval()
        with torch.no_grad():
            net(torch.rand(1, 3, 16, 16))
        width = net.latent_blocks[0].prompt_norm.normalized_shape[0]
        assert net.prompt_state.prompt.shape[1] == net.prompt_width == width


def test_the_task_pool_network_takes_no_domain_arguments_and_equals_the_switch():
    from datprl_arch.options_schema import Checker
    task_pool = ARCH_REGISTRY.get('DATPRLRestormerTaskPool')
    names = set(inspect.signature(task_pool).parameters)
    assert {'degradation_pool_size', 'fusion_method', 'use_prompt', 'dim', 'pad_multiple'} <= names
    assert not names & {'domain_pool_size', 'domain_prompt_dim', 'domain_top_k', 'prompt_fusion_method',
                        'use_domain_pool'}
    with pytest.raises(TypeError, match="unexpected keyword argument 'domain_pool_size'"):
        task_pool(domain_pool_size=6)
    checker = Checker('net.yml')  # the option-file check sees the same arguments as the constructor
    checker.arguments('network_g', {'type': 'DATPRLRestormerTaskPool', 'domain_pool_size': 6}, task_pool, 'network')
    checker.arguments('network_g', {'type': 'DATPRLRestormer', 'domain_top_k': 3, 'degradation_topk': 2},
                      ARCH_REGISTRY.get('DATPRLRestormer'), 'network')
    assert len(checker.problems) == 2
    assert 'takes no argument `domain_pool_size`' in checker.problems[0]
    assert 'takes no argument `degradation_topk` (did you mean `degradation_top_k`?' in checker.problems[1]
    small = {k: v for k, v in TINY.items() if not k.startswith('domain_') and k != 'type'}
    torch.manual_seed(0)
    switched = build_network(dict(small, type='DATPRLRestormer', use_domain_pool=False)).eval()
    torch.manual_seed(0)
    only = build_network(dict(small, type='DATPRLRestormerTaskPool')).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert list(only.state_dict()) == list(switched.state_dict()) and torch.equal(only(x), switched(x))


def test_the_nafnet_network_has_the_task_pool_only_switch():
    net = build_network(dict(TINY_NAF, use_domain_pool=False)).eval()
    keys = list(net.state_dict())
    assert not any(k.startswith(('domain_prompt_pool', 'domain_mapper', 'prompt_cross_attention')) for k in keys)
    assert any(k.startswith('degradation_prompt_pool') for k in keys)
    with torch.no_grad():
        out = net(torch.rand(2, 3, 12, 12))
    assert out.shape == (2, 3, 12, 12)
    assert net.prompt_width == 32 and net.prompt_state.domain is None and net.prompt_state.task.indices.shape == (2, 2)


def test_prompt_system_split_matches_the_spec_breakdown():
    from datprl_arch.archs.prompt import prompt_parameter_names
    net = build_network(dict(SIX_TASK))
    names = prompt_parameter_names(net)
    params = dict(net.named_parameters())
    assert sum(params[n].numel() for n in names) == 27_683_870
    assert sum(p.numel() for n, p in params.items() if n not in names) == 25_449_682


def _outputs_and_gradients(module, x):
    """``module(x)``, the gradient of ``x`` and the parameters' gradients for a fixed linear loss of the output."""
    module.zero_grad()
    x_in = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    out = module(x_in)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out, x_in.grad, [p.grad.clone() for p in module.parameters()]


def assert_same_outputs_and_gradients(a, b):
    (out_a, grad_a, params_a), (out_b, grad_b, params_b) = a, b
    assert (out_a - out_b).abs().max().item() < TOLERANCE
    assert (grad_a - grad_b).abs().max().item() < TOLERANCE
    for param_a, param_b in zip(params_a, params_b):
        assert (param_a - param_b).abs().max().item() < 1e-5


@pytest.mark.parametrize('bias', [False, True])
def test_gated_feed_forward_halves_equal_the_official_chunk(bias):
    """The two half convolutions give the official ``chunk`` computation's output and gradients (same weights)."""
    torch.manual_seed(0)
    official = GatedFeedForward(12, 2.66, bias=bias, literal=True)
    ours = GatedFeedForward(12, 2.66, bias=bias)
    ours.load_state_dict(official.state_dict())
    assert list(ours.state_dict()) == list(official.state_dict())
    x = torch.randn(2, 12, 9, 7)
    assert_same_outputs_and_gradients(_outputs_and_gradients(official, x), _outputs_and_gradients(ours, x))


@pytest.mark.parametrize('heads', [1, 2])
def test_channels_last_attention_equals_the_contiguous_one(heads):
    """In channels_last (the CPU's layout) the attention gives the contiguous computation's output and
    gradients; one head runs on token views (``_single_head_tokens``), several on the reshape, as before."""
    torch.manual_seed(0)
    attn = ChannelAttention(24, heads)
    attn.temperature.data.uniform_(0.5, 2.0)
    x = torch.randn(2, 24, 10, 12)
    contiguous = _outputs_and_gradients(attn, x)
    channels_last = _outputs_and_gradients(attn.to(memory_format=torch.channels_last),
                                           x.contiguous(memory_format=torch.channels_last))
    assert channels_last[0].is_contiguous(memory_format=torch.channels_last)
    assert_same_outputs_and_gradients(contiguous, channels_last)
