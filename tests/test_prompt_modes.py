"""The prompt modes of PromptedBackbone (``prompt: {type: ...}``): MiO IR's explicit and adaptive prompts, TAP's
low-rank prompts and DPPD's distribution prompts. Their maths against values computed by hand, then every mode
through the wrapper on two tiny backbones (EDSR: feature maps; SwinIR: tokens and a map)."""
import copy
import math
import re

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence
from torch.nn import functional as F

import datprl_arch  # noqa: F401  (registration)
from basicsr.archs import build_network
from datprl_arch.archs.prompt import dead_parameter_names
from datprl_arch.archs.prompt.modes import PROMPT_MODES, ModeState
from datprl_arch.archs.prompt.modes.distribution import DistributionPrompt, assign, gaussian_kl
from datprl_arch.archs.prompt.modes.low_rank import LowRankPrompt, low_rank_prompts
from datprl_arch.archs.prompt.modes.mio import AdaptivePrompt, ExplicitPrompt
from datprl_arch.errors import NetworkOptionError

PROBE = 16
TASKS = ('denoise', 'derain', 'dehaze')
WIDTH = 16
IMAGE = (4, 3, 16, 16)
BATCH_TASKS = ['denoise', 'dehaze', 'denoise', 'derain']  # one positive pair for the contrastive term
#: name -> (backbone options, task tap, inject_after)
BACKBONES = {
    'EDSR': (dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=8, num_block=2, upscale=1), 'body.0', ['body.1']),
    'SwinIR': (dict(type='SwinIR', upscale=1, upsampler='', img_size=PROBE, window_size=4, embed_dim=12,
                    depths=[1, 1], num_heads=[2, 2], mlp_ratio=2), 'layers.0', ['layers.1', 'conv_after_body']),
}
#: mode -> its (small) options
MODES = {
    'ExplicitPrompt': dict(tasks=list(TASKS), width=WIDTH),
    'AdaptivePrompt': dict(width=WIDTH),
    'LowRankPrompt': dict(tasks=list(TASKS), width=WIDTH, rank=3),
    'DistributionPrompt': dict(width=WIDTH, prototypes=4, query_dim=8, top_k=2),
}
#: mode -> the loss terms of a training forward with task labels
MODE_LOSSES = {'ExplicitPrompt': {'l_cls'}, 'AdaptivePrompt': set(), 'LowRankPrompt': {'l_cls', 'l_prompt_con'},
               'DistributionPrompt': {'l_assign', 'l_kl'}}
MODE_NAMES = list(MODES)
COMBINATIONS = [(mode, backbone) for backbone in BACKBONES for mode in MODES]


def options_for(mode, backbone='EDSR', taps=None, fusion=None, **prompt):
    options, task_tap, inject = BACKBONES[backbone]
    if taps is None:
        taps = {'task': task_tap} if 'task' in PROMPT_MODES[mode].taps else {}
    opt = {'type': 'PromptedBackbone', 'backbone': dict(options), 'taps': dict(taps), 'inject_after': list(inject),
           'probe_size': PROBE, 'prompt': {'type': mode, **MODES[mode], **prompt}}
    if fusion is not None:
        opt['fusion'] = dict(fusion)
    return opt


def wrapped(mode, backbone='EDSR', seed=0, **extra):
    torch.manual_seed(seed)
    return build_network(options_for(mode, backbone, **extra))


def bare(backbone, seed=3):
    torch.manual_seed(seed)
    return build_network(dict(BACKBONES[backbone][0]))


def image(seed=1, shape=IMAGE):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def labels_of(names):
    return torch.tensor([TASKS.index(n) for n in names])


def supcon_by_hand(features, labels, temperature):
    """SupCon written out: z normalised, s_ij = z_i.z_j / tau,
    L_i = -1/|P(i)| sum_p log(exp(s_ip) / sum_{a != i} exp(s_ia)), mean over the anchors with positives."""
    rows = [[float(v) for v in row] for row in features.double()]
    unit = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in rows]
    n = len(unit)

    def s(i, j):
        return sum(a * b for a, b in zip(unit[i], unit[j])) / temperature

    per_anchor = []
    for i in range(n):
        positives = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(math.exp(s(i, a)) for a in range(n) if a != i)
        per_anchor.append(-sum(math.log(math.exp(s(i, p)) / denominator) for p in positives) / len(positives))
    return sum(per_anchor) / len(per_anchor)


def mean_similarities(prompts, labels):
    """Mean cosine similarity of the same-task pairs and of the cross-task pairs."""
    unit = F.normalize(prompts, dim=-1)
    sims = unit @ unit.t()
    same = labels[:, None] == labels[None, :]
    off = ~torch.eye(len(labels), dtype=torch.bool)
    return sims[same & off].mean().item(), sims[~same].mean().item()


class LogitsFromInput(nn.Module):
    """A stand-in router whose 'image' ``[B, T, 1, 1]`` is its own logits: the test decides the task weights."""

    def forward(self, x):
        return x.flatten(1)


# ------------------------------------------------------------------------------------------------ low-rank prompts
def test_low_rank_composition_matches_hand_computed_values():
    g = torch.tensor([0.5, -1.0, 2.0])  # P = 3
    c = torch.tensor([[1.0, 0.0], [2.0, -1.0]])  # T = 2 tasks, rank 2
    b = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])  # [r, P]
    w = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    # row 0: wC = [1, 0], (wC)B = [1, 2, 0]; row 1: wC = [1.75, -0.75], (wC)B = [1.75, 2.75, 0.75]
    expected = torch.tensor([[1.5, 1.0, 2.0], [2.25, 1.75, 2.75]])
    out = low_rank_prompts(g, c, b, w)
    torch.testing.assert_close(out, expected)
    looped = [[float(g[p]) + sum(float(w[n, t] * c[t, k] * b[k, p]) for t in range(2) for k in range(2))
               for p in range(3)] for n in range(2)]
    torch.testing.assert_close(out, torch.tensor(looped))

    torch.manual_seed(0)
    mode = LowRankPrompt({'input': 3}, tasks=TASKS, width=5, rank=2)
    with torch.no_grad():
        mode.general.normal_()  # zero at init: make it count
    mode.requires_grad_(False)
    for i in range(len(TASKS)):
        prompt = mode.task_prompt(i)
        assert prompt.shape == (1, 5)
        torch.testing.assert_close(prompt, (mode.general + mode.coefficients[i] @ mode.basis)[None])
        by_hand = [float(mode.general[p]) + sum(float(mode.coefficients[i, k] * mode.basis[k, p]) for k in range(2))
                   for p in range(5)]
        torch.testing.assert_close(prompt, torch.tensor([by_hand]))


def test_low_rank_prompts_are_linear_in_the_task_weights():
    torch.manual_seed(0)
    mode = LowRankPrompt({'input': 3}, tasks=TASKS, width=6, rank=2).eval()
    with torch.no_grad():
        mode.general.normal_()
        pure = torch.cat([mode.task_prompt(i) for i in range(len(TASKS))])  # [T, P]
        weights = torch.tensor([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0], [0.0, 0.4, 0.6]])
        blended_weights = low_rank_prompts(mode.general, mode.coefficients, mode.basis, weights)
        torch.testing.assert_close(blended_weights, weights @ pure)  # blending weights == blending prompts
        torch.testing.assert_close(blended_weights[1:2], mode.task_prompt(0))
        # the forward blends the task prompts with the router's softmax
        x = image(shape=(3, 3, 16, 16))
        state = mode({'input': x}, None)
        torch.testing.assert_close(state.prompt, state.task_logits.softmax(dim=-1) @ pure)
        torch.testing.assert_close(state.task_logits, mode.router(x))


def test_low_rank_contrastive_term_equals_supcon_by_hand():
    torch.manual_seed(0)
    mode = LowRankPrompt({'input': 3}, tasks=TASKS, width=6, rank=3, classifier_weight=0.3, contrastive_weight=0.5,
                         temperature=0.2).train()
    with torch.no_grad():
        mode.router.head.weight.mul_(60)  # a decisive router: distinct prompts
    brightness = torch.tensor([0.2, 1.0, 2.0, 3.0, 5.0])[:, None, None, None]
    x, labels = image(shape=(5, 3, 16, 16)) * brightness, torch.tensor([0, 0, 1, 1, 2])  # dehaze: no positive
    state = mode({'input': x}, labels)
    assert set(state.losses) == {'l_cls', 'l_prompt_con'}
    expected = 0.5 * supcon_by_hand(state.prompt.detach(), labels.tolist(), 0.2)
    assert abs(expected - 0.5 * supcon_by_hand(state.prompt.detach(), [0, 1, 0, 1, 2], 0.2)) > 0.05  # labels matter
    assert state.losses['l_prompt_con'].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(state.losses['l_cls'], 0.3 * F.cross_entropy(state.task_logits, labels))
    assert not mode({'input': x}, None).losses  # no labels: no terms
    assert not mode.eval()({'input': x}, labels).losses  # evaluation: no terms


def test_minimising_the_contrastive_term_separates_the_tasks_prompts():
    torch.manual_seed(1)
    mode = LowRankPrompt({'input': 3}, tasks=TASKS, width=8, rank=3, classifier_weight=0, contrastive_weight=1.0,
                         temperature=0.5).train()
    mode.router = LogitsFromInput()
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    noise = torch.randn(len(labels), len(TASKS), generator=torch.Generator().manual_seed(101))
    x = (2 * F.one_hot(labels, len(TASKS)) + noise)[:, :, None, None]  # noisy task weights, mostly the own task's
    basis, general = mode.basis.detach().clone(), mode.general.detach().clone()
    with torch.no_grad():
        same_before, cross_before = mean_similarities(mode({'input': x}, labels).prompt, labels)
    optimizer = torch.optim.SGD([mode.coefficients], lr=0.5)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = mode({'input': x}, labels).losses['l_prompt_con']
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        same_after, cross_after = mean_similarities(mode({'input': x}, labels).prompt, labels)
    assert losses[-1] < 0.8 * losses[0]
    assert same_after > same_before + 0.1  # a task's prompts pulled together (0.70 -> 0.97)
    assert cross_after < cross_before - 0.3  # different tasks' pushed apart (0.19 -> -0.48)
    assert torch.equal(mode.basis, basis) and torch.equal(mode.general, general)  # the coefficients only


# ------------------------------------------------------------------------------------------------ distribution prompts
def test_prototype_assignment_matches_hand_computed_cosines():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]])
    query = torch.tensor([[3.0, 4.0], [1.0, -1.0]])
    r = 1 / math.sqrt(2)
    cosines = [[0.6, 0.8, 0.2 * r], [r, -r, -1.0]]  # (0.6, 0.8) and (r, -r) against the unit prototypes
    sims, weights = assign(query, prototypes, top_k=2, temperature=0.5)
    torch.testing.assert_close(sims, torch.tensor(cosines))
    first = [math.exp(0.6 / 0.5), math.exp(0.8 / 0.5)]  # row 0: prototypes 1, 0
    second = [math.exp(r / 0.5), math.exp(-r / 0.5)]  # row 1: prototypes 0, 1 (2 is the farthest)
    expected = [[first[0] / sum(first), first[1] / sum(first), 0.0],
                [second[0] / sum(second), second[1] / sum(second), 0.0]]
    torch.testing.assert_close(weights, torch.tensor(expected))

    _, nearest = assign(query, prototypes, top_k=1, temperature=0.5)
    assert torch.equal(nearest, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))  # one-hot on the nearest

    _, every = assign(query, prototypes, top_k=3, temperature=0.5)
    torch.testing.assert_close(every, (torch.tensor(cosines) / 0.5).softmax(dim=-1))

    torch.manual_seed(0)
    sims, weights = assign(torch.randn(6, 5), torch.randn(7, 5), top_k=3, temperature=0.1)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(6))
    assert ((weights > 0).sum(dim=-1) == 3).all()
    outside = torch.ones_like(weights, dtype=torch.bool).scatter(-1, sims.topk(3, dim=-1).indices, False)
    assert (weights[outside] == 0).all()  # zero outside each row's top 3


def test_gaussian_kl_closed_form():
    mean = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(4.0)], [math.log(0.25), 1.0]])
    # KL(N(m, v) || N(0, 1)) = (v + m^2 - 1 - log v) / 2, elementwise, then the mean
    by_hand = [0.5 * (1 + 0.25 - 1 - 0), 0.5 * (4 + 1 - 1 - math.log(4)), 0.5 * (0.25 + 4 - 1 - math.log(0.25)),
               0.5 * (math.e + 0 - 1 - 1)]
    assert gaussian_kl(mean, logvar).item() == pytest.approx(sum(by_hand) / 4, rel=1e-6)
    assert gaussian_kl(torch.zeros(3, 4), torch.zeros(3, 4)).item() == 0
    reference = kl_divergence(Normal(mean, (logvar / 2).exp()), Normal(0.0, 1.0)).mean()
    torch.testing.assert_close(gaussian_kl(mean, logvar), reference)
    torch.manual_seed(0)
    mean, logvar = torch.randn(5, 7), torch.randn(5, 7)
    reference = kl_divergence(Normal(mean, (logvar / 2).exp()), Normal(0.0, 1.0)).mean()
    torch.testing.assert_close(gaussian_kl(mean, logvar), reference)


def test_distribution_prompt_samples_in_training_and_takes_the_mean_in_evaluation():
    torch.manual_seed(0)
    mode = DistributionPrompt({'task': 8}, width=6, prototypes=4, query_dim=5, top_k=2, assignment_weight=0.2,
                              kl_weight=0.01)
    with torch.no_grad():
        mode.prompt_logvar.uniform_(-2.0, 0.0)  # different spreads by prototype and dimension
    features = {'task': torch.rand(3, 8, 6, 6, generator=torch.Generator().manual_seed(2))}
    with torch.no_grad():
        sims, weights = assign(mode.query(features['task']), mode.prototypes, 2, mode.temperature)
        mean = weights @ mode.prompt_mean  # the mixture's mean and standard deviation
        std = (weights @ mode.prompt_logvar.exp()).sqrt()

        mode.train()
        torch.manual_seed(11)
        first = mode(features, None)
        torch.manual_seed(11)
        eps = torch.randn(3, 6)
        torch.testing.assert_close(first.prompt, mean + std * eps, rtol=0, atol=1e-6)  # reparameterised
        second = mode(features, None)
        assert not torch.allclose(first.prompt, second.prompt)  # a new sample each forward
        torch.testing.assert_close(first.losses['l_assign'], 0.2 * (1 - (weights * sims).sum(dim=-1)).mean())
        torch.testing.assert_close(first.losses['l_kl'], 0.01 * gaussian_kl(mode.prompt_mean, mode.prompt_logvar))

        many = mode({'task': features['task'][:1].expand(4000, -1, -1, -1)}, None).prompt  # one image, 4000 draws
        assert ((many.mean(dim=0) - mean[0]).abs() < 4 * std[0] / math.sqrt(4000)).all()  # centred on the mean
        torch.testing.assert_close(many.std(dim=0), std[0], rtol=0.1, atol=0)

        mode.eval()
        once, again = mode(features, None), mode(features, None)
        assert torch.equal(once.prompt, weights @ mode.prompt_mean) and torch.equal(once.prompt, again.prompt)
        assert not once.losses and once.task_logits is None


# ------------------------------------------------------------------------------------------------ explicit prompts
def test_explicit_prompt_follows_labels_then_its_classifier():
    torch.manual_seed(0)
    mode = ExplicitPrompt({'input': 3}, tasks=TASKS, width=5, classifier_weight=0.3)
    x, labels = image(), labels_of(BATCH_TASKS)
    for training in (True, False):
        state = mode.train(training)({'input': x}, labels)
        assert torch.equal(state.prompt, mode.task_prompts.weight[labels]), training
        torch.testing.assert_close(state.task_logits, mode.classifier(x))
        if training:
            assert set(state.losses) == {'l_cls'}
            torch.testing.assert_close(state.losses['l_cls'], 0.3 * F.cross_entropy(state.task_logits, labels))
        else:
            assert not state.losses  # evaluation: no classifier term
    state = mode.eval()({'input': x}, None)  # evaluation without labels: the classifier's choice
    assert torch.equal(state.prompt, mode.task_prompts.weight[state.task_logits.argmax(dim=-1)])
    assert not state.losses
    with torch.no_grad():
        mode.classifier.head.bias.copy_(torch.tensor([0.0, 0.0, 100.0]))  # the classifier now says dehaze
    state = mode.eval()({'input': x}, None)
    assert torch.equal(state.prompt, mode.task_prompts.weight[[2, 2, 2, 2]])
    for i in range(len(TASKS)):
        assert torch.equal(mode.task_prompt(i), mode.task_prompts.weight[i:i + 1])
    silent = ExplicitPrompt({'input': 3}, tasks=TASKS, width=5, classifier_weight=0).train()
    assert not silent({'input': x}, labels).losses  # weight 0 turns the term off


# ------------------------------------------------------------------------------------------------ task blends
@pytest.mark.parametrize('mode_name', ['ExplicitPrompt', 'LowRankPrompt'])
def test_blend_endpoints_are_the_pure_task_prompts(mode_name):
    net = wrapped(mode_name, fusion={'gate_init': 0.5}).eval()  # gates at 0.5: the prompt changes the output
    mode = net.prompt_mode
    x = image()
    with torch.no_grad():
        if mode_name == 'LowRankPrompt':
            mode.general.normal_()
        first, last = mode.task_prompt(0), mode.task_prompt(2)

        def blend(a):
            return (1 - a) * first + a * last

        assert torch.equal(blend(0.0), first) and torch.equal(blend(1.0), last)
        outputs = {}
        for key, prompt in (('blend0', blend(0.0)), ('blend1', blend(1.0)), ('first', first), ('last', last)):
            with net.fixed_prompt(prompt):
                outputs[key] = net(x)
        assert torch.equal(outputs['blend0'], outputs['first']) and torch.equal(outputs['blend1'], outputs['last'])
        assert not torch.allclose(outputs['first'], outputs['last'])  # the two tasks restore differently


@pytest.mark.parametrize('mode_name', ['AdaptivePrompt', 'DistributionPrompt'])
def test_modes_without_task_prompts_refuse_task_prompt(mode_name):
    net = wrapped(mode_name)
    with pytest.raises(ValueError, match=f'{mode_name} has no prompt per task'):
        net.prompt_mode.task_prompt(0)


# ------------------------------------------------------------------------------------------------ through the wrapper
@pytest.mark.parametrize('mode_name, backbone', COMBINATIONS)
def test_mode_builds_and_is_the_identity_at_init(mode_name, backbone):
    plain, net = bare(backbone).eval(), wrapped(mode_name, backbone).eval()
    assert isinstance(net.prompt_mode, PROMPT_MODES[mode_name]) and net.prompt_width == WIDTH
    net.backbone.load_state_dict(plain.state_dict())
    x = image()
    with torch.no_grad():
        expected, out = plain(x), net(x)
    assert out.shape == x.shape
    assert torch.equal(out, expected)  # gate_init identity (the default): exactly the bare backbone
    assert isinstance(net.prompt_state, ModeState) and net.prompt_state.prompt.shape == (IMAGE[0], WIDTH)


@pytest.mark.parametrize('mode_name, backbone', COMBINATIONS)
def test_mode_gradients_reach_the_mode_and_the_fusions(mode_name, backbone):
    net = wrapped(mode_name, backbone, fusion={'gate_init': 0.5}).train()  # open gates (identity: below)
    x = image()
    with net.task_labels(BATCH_TASKS):
        out = net(x)
    losses = net.prompt_state.losses
    assert set(losses) == MODE_LOSSES[mode_name]
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    (F.l1_loss(out, image(seed=2)) + sum(losses.values())).backward()
    missing = [n for n, p in net.prompt_mode.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    for i, fusion in enumerate(net.fusions):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fusion.parameters()), f'fusions.{i}'


@pytest.mark.parametrize('mode_name', MODE_NAMES)
def test_mode_identity_init_opens_after_one_step(mode_name):
    net = wrapped(mode_name).train()  # gate_init identity: the fusions' last layers start at zero
    x, target = image(), image(seed=2)

    def backward():
        net.zero_grad()
        with net.task_labels(BATCH_TASKS):
            out = net(x)
        (F.l1_loss(out, target) + sum(net.prompt_state.losses.values())).backward()

    backward()
    assert all(f.cross_attn_out.weight.grad.abs().sum() > 0 for f in net.fusions)
    if not MODE_LOSSES[mode_name]:  # no loss terms of its own: the closed prompt path gives the mode nothing yet
        assert all(p.grad is None or not p.grad.any() for p in net.prompt_mode.parameters())
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    backward()
    missing = [n for n, p in net.prompt_mode.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing  # once the last layers moved, the prompt reaches the loss


@pytest.mark.parametrize('mode_name, backbone', COMBINATIONS)
def test_mode_deepcopies_and_round_trips_its_state_dict(mode_name, backbone):
    net = wrapped(mode_name, backbone, fusion={'gate_init': 0.5}).train()
    with net.task_labels(BATCH_TASKS):
        out = net(image())
    (out.mean() + sum(net.prompt_state.losses.values())).backward()  # prompt_state holds autograd history
    twin = copy.deepcopy(net).eval()
    net.eval()
    net.prompt_state = None
    x = image(2)
    with torch.no_grad():
        copied = twin(x)
        assert twin.prompt_state is not None and net.prompt_state is None  # the copy's hooks feed the copy
        expected = net(x)
        assert torch.equal(copied, expected)
        fresh = wrapped(mode_name, backbone, seed=5, fusion={'gate_init': 0.5}).eval()
        assert not torch.equal(fresh(x), expected)
        fresh.load_state_dict(net.state_dict())
        assert torch.equal(fresh(x), expected)


@pytest.mark.parametrize('mode_name, backbone', COMBINATIONS)
def test_mode_compute_prompt_is_the_forwards_prompt(mode_name, backbone):
    net = wrapped(mode_name, backbone, fusion={'gate_init': 0.5}).eval()
    x = image()
    with torch.no_grad():
        prompt = net.compute_prompt(x)
        net.prompt_state = None
        net(x)
        assert prompt.shape == (IMAGE[0], WIDTH) and torch.equal(prompt, net.prompt_state.prompt)
        if net.prompt_mode.task_names:  # under task_labels
            with net.task_labels(BATCH_TASKS):
                labelled = net.compute_prompt(x)
            pure = torch.cat([net.prompt_mode.task_prompt(i) for i in labels_of(BATCH_TASKS).tolist()])
            if mode_name == 'ExplicitPrompt':
                assert torch.equal(labelled, pure)
            else:  # the router still weighs the tasks: labels only feed the training terms
                assert torch.equal(labelled, prompt)


# ------------------------------------------------------------------------------------------------ task labels
def test_task_labels_map_names_in_the_order_of_tasks():
    net = wrapped('ExplicitPrompt').train()
    weight = net.prompt_mode.task_prompts.weight
    x = image()
    names = ['dehaze', 'denoise', 'dehaze', 'derain']
    with torch.no_grad():
        with net.task_labels(names) as same:
            assert same is net
            assert net._task_labels.tolist() == [2, 0, 2, 1]
            net(x)
            assert torch.equal(net.prompt_state.prompt, weight[[2, 0, 2, 1]]) and 'l_cls' in net.prompt_state.losses
            with net.task_labels(['derain'] * 4):
                net(x)
                assert torch.equal(net.prompt_state.prompt, weight[[1, 1, 1, 1]])
            assert net._task_labels.tolist() == [2, 0, 2, 1]  # the inner block restores the outer labels
        assert net._task_labels is None
        net.eval()(x)  # outside, in evaluation: the classifier picks (training without labels is refused)
        state = net.prompt_state
        assert torch.equal(state.prompt, weight[state.task_logits.argmax(dim=-1)]) and not state.losses
        net.train()

        message = re.escape("the batch's task 'deblur' is not in prompt.tasks ['denoise', 'derain', 'dehaze']")
        with pytest.raises(NetworkOptionError, match=message):
            with net.task_labels(['denoise', 'deblur']):
                pass
        assert net._task_labels is None
        with pytest.raises(KeyError):
            with net.task_labels(names):
                raise KeyError('inside')
        assert net._task_labels is None  # cleared after an error inside the block too
        with net.task_labels(None):
            assert net._task_labels is None

    adaptive = wrapped('AdaptivePrompt')
    with adaptive.task_labels(['anything']):  # a mode without tasks: nothing changes
        assert adaptive._task_labels is None


# ------------------------------------------------------------------------------------------------ construction errors
@pytest.mark.parametrize('prompt, taps, fragments', [
    ({'type': 'Nope'}, {}, ["prompt.type must be one of", "got 'Nope'", "'DualPool'", *map(repr, MODE_NAMES)]),
    ({'type': 'ExplicitPrompt'}, {}, ['prompt (ExplicitPrompt)', "'tasks'"]),
    ({'type': 'ExplicitPrompt', 'tasks': ['denoise']}, {},
     ['ExplicitPrompt needs tasks: a list of at least two task names', "['denoise']"]),
    ({'type': 'ExplicitPrompt', 'tasks': 'denoise'}, {}, ['ExplicitPrompt needs tasks', "'denoise'"]),
    ({'type': 'ExplicitPrompt', 'tasks': ['denoise', 'derain', 'denoise']}, {},
     ["ExplicitPrompt: tasks must be distinct, got ['denoise', 'derain', 'denoise']"]),
    ({'type': 'ExplicitPrompt', 'tasks': list(TASKS), 'rank': 2}, {},
     ['prompt (ExplicitPrompt)', "unexpected keyword argument 'rank'"]),
    ({'type': 'LowRankPrompt', 'tasks': list(TASKS), 'rank': 0}, {},
     ['LowRankPrompt: rank must be a positive integer, got 0']),
    ({'type': 'LowRankPrompt', 'tasks': list(TASKS), 'temperature': 0}, {}, ['LowRankPrompt: temperature must be']),
    ({'type': 'AdaptivePrompt', 'width': 0}, {}, ['AdaptivePrompt: width must be a positive integer, got 0']),
    ({'type': 'DistributionPrompt', 'prototypes': 2, 'top_k': 3}, {'task': 'body.0'},
     ['DistributionPrompt: top_k must lie in [1, prototypes=2], got 3']),
    ({'type': 'DistributionPrompt', 'kl_weight': -1}, {'task': 'body.0'},
     ['DistributionPrompt: kl_weight must be a number >= 0']),
    ({'type': 'DistributionPrompt'}, {}, ["taps: 'task' is missing", 'task query reads']),
    ({'type': 'AdaptivePrompt'}, {'domain': 'conv_first'}, ["taps: unknown tap 'domain'", 'reads []']),
    ({'type': 'ExplicitPrompt', 'tasks': list(TASKS)}, {'task': 'body.0'}, ["taps: unknown tap 'task'"]),
    ({'type': 'DistributionPrompt'}, {'task': 'body.0', 'domain': 'conv_first'},
     ["taps: unknown tap 'domain'", "reads ['task']"]),
])
def test_mode_construction_errors_name_the_key(prompt, taps, fragments):
    options = {**options_for('AdaptivePrompt'), 'prompt': prompt, 'taps': taps}
    with pytest.raises(NetworkOptionError) as info:
        build_network(options)
    missing = [f for f in fragments if f not in str(info.value)]
    assert not missing, str(info.value)


def test_mode_classes_are_registered():
    assert {name: PROMPT_MODES[name] for name in MODE_NAMES} == {
        'ExplicitPrompt': ExplicitPrompt, 'AdaptivePrompt': AdaptivePrompt, 'LowRankPrompt': LowRankPrompt,
        'DistributionPrompt': DistributionPrompt}


def test_explicit_prompt_without_classifier_weight_freezes_and_skips_its_classifier():
    """``classifier_weight: 0``: no loss trains the classifier, so it is frozen (DDP would wait for its gradients) and
    not run; an evaluation without labels is refused instead of following the untrained classifier."""
    torch.manual_seed(0)
    net = wrapped('ExplicitPrompt', classifier_weight=0)
    dead = dead_parameter_names(net)
    classifier = {n for n, _ in net.named_parameters() if '.classifier.' in n}
    assert classifier and classifier <= dead
    mode = ExplicitPrompt({'input': 3}, tasks=TASKS, width=5, classifier_weight=0)
    x, labels = image(), labels_of(BATCH_TASKS)
    state = mode.train()({'input': x}, labels)
    assert state.task_logits is None and not state.losses
    with pytest.raises(NetworkOptionError, match='trained with classifier_weight: 0, so its task classifier is '
                       r'untrained .*restore --task NAME'):
        mode.eval()({'input': x}, None)
    with pytest.raises(NetworkOptionError, match='trains on task labels, and this batch has none'):
        ExplicitPrompt({'input': 3}, tasks=TASKS, width=5).train()({'input': x}, None)


def test_prototype_similarities_are_float32_under_autocast():
    torch.manual_seed(0)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        sims, weights = assign(torch.randn(4, 8).bfloat16(), torch.randn(5, 8), top_k=2, temperature=0.1)
    assert sims.dtype == weights.dtype == torch.float32
    exact, _ = assign(torch.randn(4, 8).bfloat16().float(), torch.randn(5, 8), top_k=2, temperature=0.1)
    assert exact.dtype == torch.float32
