"""Gradient checkpointing of the transformer blocks (``use_checkpoint`` in network_g): same outputs and gradients,
activations recomputed in the backward pass, nothing recomputed in eval."""
import pytest
import torch

import datprl_arch  # noqa: F401  (registers the networks)
from basicsr.archs import build_network
from datprl_arch.archs.prompt import BlockStack

from networks import TINY

NETWORKS = {'DATPRLRestormer': TINY,
            'Restormer': dict(type='Restormer', dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1)}


def _count_first_block_calls(net) -> list:
    """A list that grows by one each time the first transformer block runs (a pre-hook: a recomputation stops
    early, before forward hooks fire)."""
    calls = []
    next(m for m in net.modules() if isinstance(m, BlockStack))[0].register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def _forward_backward(opt: dict, use_checkpoint: bool, x: torch.Tensor):
    torch.manual_seed(0)
    net = build_network(dict(opt, use_checkpoint=use_checkpoint))
    calls = _count_first_block_calls(net)
    out = net(x)
    out.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
    return out.detach(), grads, len(calls), net


@pytest.mark.parametrize('name', sorted(NETWORKS))
def test_checkpointing_gives_the_same_outputs_and_gradients(name):
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out, grads, calls, _ = _forward_backward(NETWORKS[name], False, x)
    out_ckpt, grads_ckpt, calls_ckpt, net = _forward_backward(NETWORKS[name], True, x)
    assert calls == 1 and calls_ckpt == 2  # the block ran again in the backward pass
    assert torch.allclose(out, out_ckpt, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys() and grads
    for key in grads:
        assert torch.allclose(grads[key], grads_ckpt[key], atol=1e-6), key
    assert all(m.use_checkpoint for m in net.modules() if isinstance(m, BlockStack))


def test_checkpointing_is_off_by_default_and_idle_without_gradients():
    net = build_network(dict(TINY, use_checkpoint=True))
    calls = _count_first_block_calls(net)
    with torch.no_grad():
        net(torch.rand(1, 3, 16, 16))
    assert calls == [1]
    assert not any(m.use_checkpoint for m in build_network(dict(TINY)).modules() if isinstance(m, BlockStack))
