"""Losses: hand-computed values (or an independent loop), gradients, autocast, registry."""
import math

import pytest
import torch

from basicsr.losses import build_loss
from basicsr.utils.registry import LOSS_REGISTRY
from datprl_arch.archs.prompt.pool import PoolOutput, PromptPool
from datprl_arch.losses import (DATPRLBalanceLoss, DATPRLDiversityLoss, DATPRLDomainAlignmentLoss, DATPRLFFTLoss,
                                DATPRLSupConLoss, TextSpaceProjection)

from networks import TINY


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def bf16_autocast():
    return torch.autocast('cpu', dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------- registry

@pytest.mark.parametrize('name, cls', [
    ('FFTLoss', DATPRLFFTLoss), ('DATPRLFFTLoss', DATPRLFFTLoss),
    ('PromptDiversityLoss', DATPRLDiversityLoss), ('DATPRLDiversityLoss', DATPRLDiversityLoss),
    ('PromptBalanceLoss', DATPRLBalanceLoss), ('DATPRLBalanceLoss', DATPRLBalanceLoss),
    ('PromptContrastiveLoss', DATPRLSupConLoss), ('DATPRLSupConLoss', DATPRLSupConLoss),
    ('DomainPriorAlignmentLoss', DATPRLDomainAlignmentLoss), ('DATPRLDomainAlignmentLoss', DATPRLDomainAlignmentLoss),
])
def test_registered_and_built_from_options(name, cls):
    assert LOSS_REGISTRY.get(name) is cls
    loss = build_loss({'type': name, 'loss_weight': 0.5})
    assert isinstance(loss, cls) and loss.loss_weight == 0.5


# ------------------------------------------------------------------------------------------------------------- FFT

def test_fft_loss_2x2_by_hand():
    # a 2x2 real DFT is real: X00 = a+b+c+d, X01 = a-b+c-d, X10 = a+b-c-d, X11 = a-b-c+d; W//2+1 = 2 columns
    pred = torch.tensor([[[[1., 2.], [3., 4.]]]])
    gt = torch.zeros(1, 1, 2, 2)
    spectrum = [10, -2, -4, 0]  # |X| of pred; imaginary parts 0
    expected = sum(abs(v) for v in spectrum) / 8  # mean over 4 frequencies x (real, imag)
    assert DATPRLFFTLoss()(pred, gt).item() == pytest.approx(expected)
    assert DATPRLFFTLoss(loss_weight=0.1)(pred, gt).item() == pytest.approx(0.1 * expected)
    assert DATPRLFFTLoss(reduction='sum')(pred, gt).item() == pytest.approx(16.0)


def dft_l1_loop(pred, gt, full=False):
    """Mean |Re| + |Im| difference of the one-sided (or ``full``) 2-D DFT, written as a plain loop over frequencies."""
    b, c, h, w = pred.shape
    total, count = 0.0, 0
    for bi in range(b):
        for ci in range(c):
            for k in range(h):
                for col in range(w if full else w // 2 + 1):
                    re = im = 0.0
                    for m in range(h):
                        for n in range(w):
                            angle = -2 * math.pi * (k * m / h + col * n / w)
                            d = float(pred[bi, ci, m, n] - gt[bi, ci, m, n])
                            re += d * math.cos(angle)
                            im += d * math.sin(angle)
                    total += abs(re) + abs(im)
                    count += 2
    return total / count


def test_fft_loss_matches_a_dft_loop_and_reduction_none_shape():
    g = torch.Generator().manual_seed(0)
    pred, gt = torch.rand(2, 2, 3, 5, generator=g), torch.rand(2, 2, 3, 5, generator=g)
    assert DATPRLFFTLoss()(pred, gt).item() == pytest.approx(dft_l1_loop(pred, gt), rel=1e-5)
    assert DATPRLFFTLoss(reduction='none')(pred, gt).shape == (2, 2, 3, 3, 2)


def test_full_fft_loss_matches_the_two_sided_dft_loop():
    g = torch.Generator().manual_seed(1)
    pred, gt = torch.rand(1, 2, 3, 4, generator=g), torch.rand(1, 2, 3, 4, generator=g)
    assert DATPRLFFTLoss(full=True)(pred, gt).item() == pytest.approx(dft_l1_loop(pred, gt, full=True), rel=1e-5)
    assert DATPRLFFTLoss(full=True, reduction='none')(pred, gt).shape == (1, 2, 3, 4, 2)


def test_fft_loss_float32_under_autocast_and_errors():
    g = torch.Generator().manual_seed(1)
    pred, gt = torch.rand(1, 3, 8, 8, generator=g, requires_grad=True), torch.rand(1, 3, 8, 8, generator=g)
    with bf16_autocast():
        value = DATPRLFFTLoss()(pred, gt)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(DATPRLFFTLoss()(pred, gt).item(), rel=1e-6)
    value.backward()
    assert pred.grad.abs().sum() > 0
    with pytest.raises(ValueError, match='reduction must be one of'):
        DATPRLFFTLoss(reduction='avg')
    with pytest.raises(ValueError, match=r'one shape, got \(1, 3, 8, 8\) and \(1, 3, 8, 4\)'):
        DATPRLFFTLoss()(pred, gt[..., :4])


# ------------------------------------------------------------------------------------------------------- diversity

def test_diversity_by_hand():
    # keys: k1 = 2 k0 (cos 1), k2 orthogonal -> off-diagonal S_K has two entries 1 -> ReLU(1-0.1) twice / 9
    keys = torch.tensor([[1., 0.], [2., 0.], [0., 1.]])
    # values (T=1): v0 ⊥ v1, v2 at 45° to both -> four entries 1/√2
    values = torch.tensor([[[1., 0.]], [[0., 1.]], [[1., 1.]]])
    key_term = 2 * 0.9 / 9
    value_term = 4 * (1 / math.sqrt(2) - 0.1) / 9
    expected = 0.5 * (key_term + value_term)
    assert DATPRLDiversityLoss()((keys, values)).item() == pytest.approx(expected)
    # two pools are summed, loss_weight multiplies
    assert DATPRLDiversityLoss(loss_weight=2.0)((keys, values), (keys, values)).item() == pytest.approx(4 * expected)


def diversity_loop(keys, values, tau):
    def term(rows):
        p = len(rows)
        total = 0.0
        for i in range(p):
            for j in range(p):
                s = 0.0 if i == j else cosine(rows[i], rows[j])
                total += max(s - tau, 0.0)
        return total / (p * p)
    flat_values = [v.flatten().tolist() for v in values]
    return 0.5 * (term(flat_values) + term(keys.tolist()))


def test_diversity_on_a_pool_matches_a_loop_and_grads_reach_keys_and_values():
    torch.manual_seed(0)
    pool = PromptPool(pool_size=4, prompt_dim=6, top_k=2, value_num_tokens=3)
    with torch.no_grad():  # row 1 almost duplicates row 0: a pair far above the threshold
        pool.prompt_keys[1] = pool.prompt_keys[0] + 0.01
        pool.prompt_values[1] = pool.prompt_values[0] + 0.01
    loss = DATPRLDiversityLoss(threshold=0.1)(pool)
    assert loss.item() == pytest.approx(diversity_loop(pool.prompt_keys.detach(), pool.prompt_values.detach(), 0.1),
                                        rel=1e-5)
    loss.backward()
    for param in (pool.prompt_keys, pool.prompt_values):
        assert param.grad[0].abs().sum() > 0 and param.grad[1].abs().sum() > 0
    assert pool.temperature.grad is None
    assert all(p.grad is None for p in pool.value_aggregation.parameters())


def test_diversity_is_zero_for_orthogonal_prompts_and_float32_under_autocast():
    keys = torch.eye(3, 4)
    values = torch.eye(3, 8).reshape(3, 2, 4)
    assert DATPRLDiversityLoss()((keys, values)).item() == 0.0
    torch.manual_seed(1)
    pool = PromptPool(3, 8, 2, 2)
    with bf16_autocast():
        value = DATPRLDiversityLoss(threshold=-0.5)(pool)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(DATPRLDiversityLoss(threshold=-0.5)(pool).item(), rel=1e-6)
    with pytest.raises(TypeError, match='expected a PromptPool or a \\(keys, values\\) tensor pair, got int'):
        DATPRLDiversityLoss()(3)
    with pytest.raises(ValueError, match='at least one prompt pool'):
        DATPRLDiversityLoss()()


# --------------------------------------------------------------------------------------------------------- balance

def test_balance_by_hand():
    # row 0: softmax(0, ln 3) = (1/4, 3/4); row 1: (1/2, 1/2) -> u = (3/8, 5/8)
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    assert DATPRLBalanceLoss()(logits).item() == pytest.approx(2 * (9 / 64 + 25 / 64) - 1)
    kl = 3 / 8 * math.log(2 * 3 / 8) + 5 / 8 * math.log(2 * 5 / 8)
    assert DATPRLBalanceLoss(mode='kl')(logits).item() == pytest.approx(kl)
    # one prompt takes everything: P - 1 and log P
    peaked = torch.tensor([[60.0, 0.0, 0.0, 0.0]])
    assert DATPRLBalanceLoss()(peaked).item() == pytest.approx(3.0)
    assert DATPRLBalanceLoss(mode='kl')(peaked).item() == pytest.approx(math.log(4.0), rel=1e-5)


def test_balance_is_minimal_at_uniform_usage_and_takes_pool_outputs():
    uniform = torch.zeros(3, 5, requires_grad=True)
    for mode in ('square', 'kl'):
        loss = DATPRLBalanceLoss(mode=mode)(uniform)
        assert loss.item() == pytest.approx(0.0, abs=1e-6)
        loss.backward()
        assert uniform.grad.abs().max() < 1e-6  # a stationary point
        uniform.grad = None
        g = torch.Generator().manual_seed(2)
        assert DATPRLBalanceLoss(mode=mode)(torch.randn(3, 5, generator=g)).item() > 0
    # soft usage is also uniform when the rows are skewed in opposite directions
    opposite = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert DATPRLBalanceLoss()(opposite).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]], requires_grad=True)
    out = PoolOutput(prompt=torch.zeros(2, 4), indices=torch.zeros(2, 1, dtype=torch.long), logits=logits,
                     weights=torch.ones(2, 1))
    loss = DATPRLBalanceLoss(loss_weight=0.1)(out, logits)
    assert loss.item() == pytest.approx(0.1 * 2 * (2 * (9 / 64 + 25 / 64) - 1))
    loss.backward()
    assert logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="mode must be one of \\('square', 'kl'\\), got 'l2'"):
        DATPRLBalanceLoss(mode='l2')


def test_balance_float32_under_autocast():
    logits = torch.tensor([[0.3, -0.2, 0.1]])
    with bf16_autocast():
        value = DATPRLBalanceLoss()(logits.bfloat16())
    assert value.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------- contrastive

def test_supcon_by_hand():
    # z0 = z1 = e1 (label 0), z2 = e2 (label 1, no positive); τ = 1:
    # anchor 0: -log(e / (e + 1)) = log(1 + 1/e); anchor 1 the same; anchor 2 is left out
    features = torch.tensor([[1., 0.], [2., 0.], [0., 3.]])
    expected = math.log(1 + math.exp(-1))
    assert DATPRLSupConLoss(temperature=1.0)(features, [0, 0, 1]).item() == pytest.approx(expected)
    assert DATPRLSupConLoss(loss_weight=0.1, temperature=1.0)(features, torch.tensor([0, 0, 1])).item() == \
        pytest.approx(0.1 * expected)


def supcon_loop(features, labels, tau):
    z = [[x / math.sqrt(sum(v * v for v in row)) for x in row] for row in features.tolist()]
    losses = []
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(math.exp(sum(a * b for a, b in zip(z[i], z[a])) / tau) for a in range(len(z)) if a != i)
        losses.append(-sum(sum(a * b for a, b in zip(z[i], z[p])) / tau - math.log(denominator)
                           for p in positives) / len(positives))
    return sum(losses) / len(losses), losses


def test_supcon_matches_a_loop_and_ignores_anchors_without_positives():
    g = torch.Generator().manual_seed(4)
    features = torch.randn(6, 5, generator=g, requires_grad=True)
    labels = [0, 1, 0, 2, 1, 0]  # sample 3 has no positive
    expected, per_anchor = supcon_loop(features.detach(), labels, 0.1)
    loss = DATPRLSupConLoss(temperature=0.1)(features, labels)
    assert len(per_anchor) == 5
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss.item() != pytest.approx(sum(per_anchor) / 6, rel=1e-3)  # not averaged over all six
    loss.backward()
    assert features.grad[3].abs().sum() > 0  # still a negative for the others


def test_supcon_without_any_positive_is_zero_with_grad():
    features = torch.randn(3, 4, requires_grad=True)
    loss = DATPRLSupConLoss()(features, [0, 1, 2])
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(features.grad, torch.zeros(3, 4))
    single = torch.randn(1, 4, requires_grad=True)
    assert DATPRLSupConLoss()(single, [0]).item() == 0.0


def test_supcon_float32_under_autocast_and_errors():
    g = torch.Generator().manual_seed(5)
    features = torch.randn(4, 8, generator=g)
    with bf16_autocast():
        value = DATPRLSupConLoss()(features, [0, 0, 1, 1])
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(DATPRLSupConLoss()(features, [0, 0, 1, 1]).item(), rel=1e-6)
    with pytest.raises(ValueError, match=r'features \[B, F\] and labels \[B\], got \(4, 8\) and \(3,\)'):
        DATPRLSupConLoss()(features, [0, 0, 1])
    with pytest.raises(ValueError, match='temperature must be positive'):
        DATPRLSupConLoss(temperature=0.0)


# ------------------------------------------------------------------------------------------------------ alignment

def test_alignment_cosine_by_hand():
    prompt = torch.tensor([[1., 0.], [0., 3.]])
    text = torch.tensor([[2., 0.], [1., 1.]])
    expected = (0 + (1 - 1 / math.sqrt(2))) / 2
    assert DATPRLDomainAlignmentLoss()(prompt, text).item() == pytest.approx(expected)
    assert DATPRLDomainAlignmentLoss(loss_weight=2.0)(prompt, text).item() == pytest.approx(2 * expected)


def infonce_loop(prompt, text, tau):
    p = [[x / math.sqrt(sum(v * v for v in r)) for x in r] for r in prompt.tolist()]
    t = [[x / math.sqrt(sum(v * v for v in r)) for x in r] for r in text.tolist()]
    n = len(p)
    same = [[i == j or cosine(t[i], t[j]) > 1 - 1e-5 for j in range(n)] for i in range(n)]

    def direction(a, b):  # rows of a against rows of b
        total = 0.0
        for i in range(n):
            logits = [sum(x * y for x, y in zip(a[i], b[j])) / tau for j in range(n)]
            log_z = math.log(sum(math.exp(v) for v in logits))
            targets = [j for j in range(n) if same[i][j]]
            total += -sum(logits[j] - log_z for j in targets) / len(targets)
        return total / n

    return 0.5 * (direction(p, t) + direction(t, p))


def test_alignment_infonce_matches_a_loop_with_a_shared_text():
    g = torch.Generator().manual_seed(6)
    prompt = torch.randn(4, 3, generator=g)
    text = torch.randn(4, 3, generator=g)
    text[3] = 2 * text[1]  # samples 1 and 3 share a text (e.g. a source's mean fallback)
    loss = DATPRLDomainAlignmentLoss(mode='infonce', temperature=0.5)(prompt, text)
    assert loss.item() == pytest.approx(infonce_loop(prompt, text, 0.5), rel=1e-5)


def test_alignment_projection_gets_grads_text_does_not():
    torch.manual_seed(7)
    projection = TextSpaceProjection(prompt_dim=6, text_dim=4)
    prompt = torch.randn(3, 6, requires_grad=True)
    text = torch.randn(3, 4, requires_grad=True)
    for mode in ('cosine', 'infonce'):
        loss = DATPRLDomainAlignmentLoss(mode=mode)(prompt, text, projection)
        expected = DATPRLDomainAlignmentLoss(mode=mode)(prompt @ projection.linear.weight.t(), text)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        loss.backward()
    assert projection.linear.weight.grad.abs().sum() > 0 and prompt.grad.abs().sum() > 0
    assert text.grad is None
    assert projection.linear.bias is None and list(projection.state_dict()) == ['linear.weight']


def test_alignment_float32_under_autocast_and_errors():
    projection = TextSpaceProjection(6, 4)
    prompt, text = torch.randn(3, 6), torch.randn(3, 4)
    for mode in ('cosine', 'infonce'):
        with bf16_autocast():
            value = DATPRLDomainAlignmentLoss(mode=mode)(prompt, text, projection)
        assert value.dtype == torch.float32
        assert value.item() == pytest.approx(DATPRLDomainAlignmentLoss(mode=mode)(prompt, text, projection).item(),
                                             rel=1e-6)
    with pytest.raises(ValueError, match=r'got \(3, 6\) and \(3, 4\)\. Give the loss a TextSpaceProjection'):
        DATPRLDomainAlignmentLoss()(prompt, text)
    with pytest.raises(ValueError, match="mode must be one of \\('cosine', 'infonce'\\), got 'l2'"):
        DATPRLDomainAlignmentLoss(mode='l2')


# ------------------------------------------------------------------------------------- on a real network's prompts


def test_prompt_losses_on_a_network_step_under_autocast():
    from basicsr.archs import build_network
    torch.manual_seed(8)
    net = build_network(dict(TINY)).train()
    projection = TextSpaceProjection(32, 12)
    with bf16_autocast():
        net(torch.rand(4, 3, 16, 16))
        state = net.prompt_state
        terms = {
            'diversity': DATPRLDiversityLoss()(net.degradation_prompt_pool, net.domain_prompt_pool),
            'balance': DATPRLBalanceLoss()(state.task, state.domain),
            'contrastive': DATPRLSupConLoss()(state.task_query, [0, 0, 1, 1]),
            'alignment': DATPRLDomainAlignmentLoss(mode='infonce')(state.domain.prompt, torch.randn(4, 12),
                                                                   projection),
        }
    grads = {}
    for name, loss in terms.items():
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        net.zero_grad(set_to_none=True)
        projection.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        grads[name] = {n for n, p in [*net.named_parameters(), *projection.named_parameters()]
                       if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads['diversity'] == {f'{pool}.{p}' for pool in ('degradation_prompt_pool', 'domain_prompt_pool')
                                  for p in ('prompt_keys', 'prompt_values')}
    assert {'degradation_prompt_pool.prompt_keys', 'domain_prompt_pool.temperature'} <= grads['balance']
    assert any(n.startswith('degradation_mapper.') for n in grads['balance'])
    assert any(n.startswith('degradation_mapper.') for n in grads['contrastive'])
    assert not any(n.startswith('domain_') for n in grads['contrastive'])
    assert 'linear.weight' in grads['alignment']
    assert any(n.startswith('domain_prompt_pool.value_aggregation') for n in grads['alignment'])
    assert not any(n.startswith('degradation_') for n in grads['alignment'])
