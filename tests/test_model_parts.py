"""Training-model building blocks: optimizers, schedulers, parameter groups, freezing, reports, prompt analysis."""
import json
import math

import numpy as np
import pytest
import torch

import datprl_arch  # noqa: F401
from basicsr.archs import build_network
from datprl_arch.archs.prompt import prompt_parameter_names
from datprl_arch.models.analysis import PromptAnalysis, normalized_mutual_information, pca_2d
from datprl_arch.models.optim import (OPTIMIZERS, CosineAnnealingRestartCyclicLR, build_optimizer, build_scheduler,
                                      parameter_groups, resolve_parts)
from datprl_arch.models.reporting import ValidationReport

from networks import TINY


@pytest.fixture(scope='module')
def net():
    torch.manual_seed(0)
    return build_network(dict(TINY))


@pytest.mark.parametrize('name', sorted(OPTIMIZERS))
def test_every_optimizer_builds_and_steps(name):
    torch.manual_seed(0)
    net = build_network(dict(TINY))  # its own network: the step changes the weights the module's fixture shares
    groups = parameter_groups(net, 1e-3, None)
    optimizer = build_optimizer({'type': name, 'lr': 1e-3}, groups)
    assert type(optimizer).__name__ == name
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    torch.manual_seed(1)
    x = torch.rand(2, 3, 16, 16)
    (net.train()(x) - x).abs().mean().backward()
    optimizer.step()
    trained = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    moved = {n for n, p in net.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert len(trained) > len(before) // 2  # the step had gradients for most of the network
    assert moved <= trained  # nothing without a gradient moved
    assert len(moved) >= 0.9 * len(trained)  # (a tiny gradient on a gate can move it by less than its float32 step)


def test_unknown_optimizer_and_scheduler_list_the_choices(net):
    with pytest.raises(ValueError, match="'Adamm' is not supported; use one of .*'AdamW'"):
        build_optimizer({'type': 'Adamm', 'lr': 1e-3}, parameter_groups(net, 1e-3, None))
    optimizer = build_optimizer({'type': 'Adam', 'lr': 1e-3}, parameter_groups(net, 1e-3, None))
    with pytest.raises(ValueError, match="'Cosine' is not supported; use one of .*'CosineAnnealingLR'"):
        build_scheduler({'type': 'Cosine'}, optimizer)


def test_prompt_lr_splits_backbone_and_prompt_system(net):
    groups = parameter_groups(net, 1e-3, 5e-4)
    assert [(g['name'], g['lr']) for g in groups] == [('backbone', 1e-3), ('prompts', 5e-4)]
    prompt_ids = {id(p) for p in groups[1]['params']}
    names = prompt_parameter_names(net)
    assert prompt_ids == {id(p) for n, p in net.named_parameters() if n in names}
    assert any(n.startswith('degradation_mapper') for n in names)  # the official 'prompt' name rule missed these
    assert any(n.endswith('feature_weight') for n in names)
    total = sum(len(g['params']) for g in groups)
    assert total == len(list(net.parameters()))


def test_freeze_parts(net):
    assert resolve_parts(net, ['prompts']) == prompt_parameter_names(net)
    backbone = resolve_parts(net, ['backbone'])
    assert backbone.isdisjoint(prompt_parameter_names(net)) and 'patch_embed.proj.weight' in backbone
    assert resolve_parts(net, ['degradation_prompt_pool']) == {
        n for n, _ in net.named_parameters() if n.startswith('degradation_prompt_pool.')}
    with pytest.raises(ValueError, match="'decoder_level9' matches no parameter"):
        resolve_parts(net, ['decoder_level9'])


def test_cyclic_cosine_schedule_values():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = CosineAnnealingRestartCyclicLR(optimizer, periods=[4, 4], restart_weights=[1, 1],
                                               eta_mins=[0.5, 0.0])
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]['lr'])
        optimizer.step()
        scheduler.step()
    # BasicSR's convention: a cycle ends at its eta_min (iteration 4), the next one starts one step into it
    expected = [0.5 + 0.25 * (1 + math.cos(math.pi * t / 4)) for t in range(5)]
    expected += [0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(1, 4)]
    assert np.allclose(lrs, expected)


def test_validation_report_averages_all_sets_and_domains(tmp_path):
    report = ValidationReport(3, str(tmp_path / 'metrics.json'))
    assert report.add(100, 'rain', 'natural', {'psnr': 30.0, 'ssim': 0.9}) is None
    assert report.add(100, 'sr', 'natural', {'psnr': 26.0, 'ssim': 0.7}) is None
    summary = report.add(100, 'ct', 'medical', {'psnr': 40.0, 'ssim': 0.95})
    assert 'average over 3 sets: psnr: 32.0000' in summary
    assert 'domain natural (2 sets): psnr: 28.0000  ssim: 0.8000' in summary
    written = json.loads((tmp_path / 'metrics.json').read_text())
    assert written['100']['average']['psnr'] == pytest.approx(32.0)
    assert written['100']['domains']['medical'] == {'psnr': 40.0, 'ssim': 0.95}
    assert list(written['100']['sets']) == ['rain', 'sr', 'ct']
    assert written['100']['sets']['ct'] == {'domain': 'medical', 'task': 'ct', 'psnr': 40.0, 'ssim': 0.95}


def test_nmi_and_projection():
    assert normalized_mutual_information([0, 0, 1, 1], [3, 3, 9, 9]) == pytest.approx(1.0)
    assert normalized_mutual_information([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(0.0)
    # hand computed: joint [[.5, 0], [.25, .25]] -> I = .5 ln2 + .25 ln(.5) + .25 ln(2) ... checked numerically
    a, b = [0, 0, 1, 1], [0, 0, 0, 1]
    pj = np.array([[0.5, 0.0], [0.25, 0.25]])
    pa, pb = pj.sum(1), pj.sum(0)
    mi = sum(pj[i, j] * np.log(pj[i, j] / (pa[i] * pb[j])) for i in range(2) for j in range(2) if pj[i, j])
    h = lambda p: -sum(x * np.log(x) for x in p if x)  # noqa: E731
    assert normalized_mutual_information(a, b) == pytest.approx(2 * mi / (h(pa) + h(pb)))
    x = np.random.default_rng(0).normal(size=(20, 5)) * np.array([10, 1, 1, 1, 0.1])
    xy = pca_2d(x)
    assert xy.shape == (20, 2) and xy[:, 0].var() > xy[:, 1].var()


def test_prompt_analysis_writes_every_file(tmp_path, net):
    analysis = PromptAnalysis(str(tmp_path))
    net.eval()
    with torch.no_grad():
        for source, domain in (('rain', 'natural'), ('ct', 'medical')):
            net(torch.rand(2, 3, 16, 16))
            analysis.collect(net.prompt_state, {'task': source, 'domain': domain, 'source': source})
    folder = analysis.write(500, net)
    selection = json.loads(open(f'{folder}/selection.json').read())
    assert set(selection) == {'task_pool', 'domain_pool'} and set(selection['task_pool']) == {'rain', 'ct'}
    assert sum(selection['task_pool']['rain'].values()) == 2 * 2  # 2 images x top-2
    nmi = json.loads(open(f'{folder}/nmi.json').read())
    assert 0.0 <= nmi['task_pool']['task'] <= 1.0
    gates = json.loads(open(f'{folder}/gates.json').read())
    assert gates['latent_blocks.0'] == {'feature': pytest.approx(0.5), 'prompt': pytest.approx(0.5)}
    assert len(json.loads(open(f'{folder}/prompts_2d.json').read())['xy']) == 4
    pytest.importorskip('matplotlib')
    assert (tmp_path / '500' / 'selection.png').stat().st_size > 0
    assert (tmp_path / '500' / 'prompts_2d.png').stat().st_size > 0


def test_a_resumed_report_keeps_earlier_rounds(tmp_path):
    first = ValidationReport(1, str(tmp_path / 'metrics.json'))
    first.add(100, 'rain', 'natural', {'psnr': 30.0})
    resumed = ValidationReport(1, str(tmp_path / 'metrics.json'), resume=True)
    resumed.add(200, 'rain', 'natural', {'psnr': 31.0})
    assert list(json.loads((tmp_path / 'metrics.json').read_text())) == ['100', '200']
    fresh = ValidationReport(1, str(tmp_path / 'metrics.json'))
    fresh.add(300, 'rain', 'natural', {'psnr': 32.0})
    assert list(json.loads((tmp_path / 'metrics.json').read_text())) == ['300']
