"""Training stages (``train.stages``: MiO's sequential learning, TAP's prompt tuning) and the prompt modes' losses in
the training model: stage parsing, switching at the right iterations (tasks, freezing, optimizer), resume, and
runs through BasicSR's runner."""
import re

import numpy as np
import pytest
import torch

import datprl_arch  # noqa: F401
from basicsr.data import build_dataset
from basicsr.models import build_model
from datprl_arch.data.sampling import BalancedSchedule
from datprl_arch.models.stages import Stage, parse_stages, stage_at
from datprl_arch.options import OptionFileError

from test_training import SOURCES, _model_opt, data, finish, options, train, write  # noqa: F401

TASKS = [s[2] for s in SOURCES]  # derain, deblur, ct_denoise
EDSR = dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=8, num_block=2, upscale=1)


def wrapped(prompt, taps=None):
    return dict(type='PromptedBackbone', backbone=dict(EDSR), taps=taps or {}, inject_after=['body.1'],
                prompt=prompt, probe_size=16)


def test_stages_parse_with_defaults_and_the_last_running_to_the_end():
    stages = parse_stages([{'until_iter': 3, 'tasks': ['derain']}, {'freeze': ['backbone'], 'lr': 1e-3}], 10)
    assert stages == [Stage(0, 1, 3, ('derain',)), Stage(1, 4, 10, None, ('backbone',), 1e-3)]
    assert not stages[0].new_optimizer and stages[1].new_optimizer
    assert [stage_at(stages, i).index for i in (1, 3, 4, 10, 11)] == [0, 0, 1, 1, 1]
    assert parse_stages(None, 10) == [] and stage_at([], 5) is None


@pytest.mark.parametrize('stages, message', [
    ([{'until': 3}], r"train.stages\[0\]: unknown key 'until'"),
    ([{'until_iter': 5}, {'until_iter': 4}], r'train.stages\[1\].until_iter must be an integer >= 6'),
    ([{'until_iter': 3}, {'until_iter': 8}], r'train.stages\[1\].until_iter is 8, before train.total_iter 10'),
    ([{'until_iter': 3}, {}], None),
    ([{'until_iter': 3, 'lr': -1}, {}], r'train.stages\[0\].lr must be a positive number'),
    ([{'until_iter': 3, 'tasks': 'derain'}, {}], r'train.stages\[0\].tasks must be a non-empty list of names'),
    ([{'until_iter': 3, 'reset_optimizer': 'yes'}, {}], r'reset_optimizer must be true or false'),
    ([], r'train.stages must be a non-empty list'),
])
def test_bad_stages_name_the_key(stages, message):
    if message is None:
        assert len(parse_stages(stages, 10)) == 2
        return
    with pytest.raises(ValueError, match=message):
        parse_stages(stages, 10)


def test_an_active_mask_restricts_the_balanced_draw_to_its_sources():
    schedule = BalancedSchedule([4, 4, 4], [1, 1, 1], [1, 1, 1], seed=0)
    active = np.array([True, False, True])
    for start in range(0, 12, 6):
        sources = [s for s, _ in schedule.draw_batch(list(range(start, start + 6)), active)]
        assert set(sources) == {0, 2} and sources.count(0) == sources.count(2) == 3
    assert {s for s, _ in schedule.draw_batch(list(range(6)))} == {0, 1, 2}


def _staged_model(root, tmp_path, network, **train_opt):
    opt = _model_opt(root, tmp_path, **train_opt)
    opt['network_g'] = network
    dataset = build_dataset(opt['datasets']['train'])  # BasicSR builds the training set before the model
    return build_model(opt), dataset


def _trainable(model):
    return {n for n, p in model.net_g.named_parameters() if p.requires_grad}


def test_stages_switch_tasks_freezing_and_optimizer_at_their_iterations(tmp_path, data):  # noqa: F811
    stages = [{'until_iter': 2, 'tasks': ['derain']}, {'until_iter': 4, 'tasks': ['derain', 'deblur']},
              {'freeze': ['backbone'], 'lr': 1e-3, 'reset_optimizer': True}]
    model, dataset = _staged_model(data, tmp_path, wrapped({'type': 'AdaptivePrompt', 'width': 8}), stages=stages,
                                   total_iter=6)
    everything = {n for n, _ in model.net_g.named_parameters()}
    assert dataset.stage_sources.tolist() == [True, False, False]
    assert [s for s, _ in dataset.schedule.draw_batch(range(6), dataset.stage_sources.numpy())] == [0] * 6
    first_optimizer = model.optimizer_g
    assert _trainable(model) == everything and model.optimizer_g.param_groups[0]['lr'] == 2e-4
    model._update_stage(2)
    assert model.stage.index == 0
    model._update_stage(3)
    assert model.stage.index == 1 and dataset.stage_sources.tolist() == [True, True, False]
    assert model.optimizer_g is first_optimizer  # same parameters, no reset asked: the optimizer carries on
    model._update_stage(5)
    assert model.stage.index == 2 and dataset.stage_sources.tolist() == [True, True, True]
    trainable = _trainable(model)
    assert trainable and all(not n.startswith('backbone.') for n in trainable)
    assert model.optimizer_g is not first_optimizer and model.optimizer_g.param_groups[0]['lr'] == 1e-3
    optimized = {id(p) for g in model.optimizer_g.param_groups for p in g['params']}
    assert optimized == {id(p) for n, p in model.net_g.named_parameters() if n in trainable}
    total = sum(p.numel() for p in model.net_g.parameters())
    assert [p['trainable_params'] for p in model.stage_plan][:2] == [total, total]
    assert model.stage_plan[2]['trainable_params'] == sum(p.numel() for p in model.net_g.parameters()
                                                          if p.requires_grad)


def test_a_stage_task_that_the_training_set_lacks_is_an_error(tmp_path, data):  # noqa: F811
    with pytest.raises(ValueError, match=r"train.stages: task 'dehaze' is not a task of the training set"):
        _staged_model(data, tmp_path, wrapped({'type': 'AdaptivePrompt', 'width': 8}),
                      stages=[{'until_iter': 2, 'tasks': ['dehaze']}, {}])


def test_freezing_everything_or_nothing_found_is_an_option_error_at_model_build(tmp_path, data):  # noqa: F811
    """The option check refuses these before any data is read (test_reliability); built without it (BasicSR's API),
    the model still ends with an option error naming the key, never with autograd's 'does not require grad'."""
    network = wrapped({'type': 'AdaptivePrompt', 'width': 8})
    with pytest.raises(OptionFileError, match=r"train.stages\[1\].freeze: stage 2 \(iters 3-6\), freezing "
                                              r"\['backbone', 'prompts'\] leaves no trainable parameter of "
                                              r'PromptedBackbone \(all \d+ tensors frozen, nothing would train\)'):
        _staged_model(data, tmp_path, network, stages=[{'until_iter': 2}, {'freeze': ['backbone', 'prompts']}],
                      total_iter=6)
    with pytest.raises(OptionFileError, match=r"train.freeze: 'backbon' matches no parameter of PromptedBackbone"):
        _staged_model(data, tmp_path, network, freeze=['backbon'])


def test_resuming_enters_the_saved_stage_before_loading_its_optimizer(tmp_path, data):  # noqa: F811
    stages = [{'until_iter': 2}, {'freeze': ['backbone']}]
    network = wrapped({'type': 'AdaptivePrompt', 'width': 8})
    model, _ = _staged_model(data, tmp_path, network, stages=stages, total_iter=6)
    model._update_stage(3)
    state = {'epoch': 0, 'iter': 3, 'optimizers': [o.state_dict() for o in model.optimizers],
             'schedulers': [s.state_dict() for s in model.schedulers]}
    fresh, _ = _staged_model(data, tmp_path, network, stages=stages, total_iter=6)
    assert fresh.stage.index == 0
    fresh.resume_training(state)
    assert fresh.stage.index == 1 and _trainable(fresh) == _trainable(model)


def _mode_batch(names):
    n = len(names)
    return {'lq': torch.rand(n, 3, 16, 16), 'gt': torch.rand(n, 3, 16, 16), 'task_name': names,
            'task': torch.tensor([TASKS.index(t) for t in names]), 'gt_path': [f'/x/img00{i}.png' for i in range(n)]}


@pytest.mark.parametrize('prompt, taps, terms', [
    ({'type': 'ExplicitPrompt', 'tasks': TASKS, 'width': 8}, None, {'l_cls'}),
    ({'type': 'LowRankPrompt', 'tasks': TASKS, 'width': 8, 'rank': 2}, None, {'l_cls', 'l_prompt_con'}),
    ({'type': 'DistributionPrompt', 'width': 8, 'prototypes': 4, 'query_dim': 8}, {'task': 'body.0'},
     {'l_assign', 'l_kl'}),
    ({'type': 'AdaptivePrompt', 'width': 8}, None, set()),
])
def test_the_model_adds_each_modes_losses_and_feeds_task_labels(tmp_path, data, prompt, taps, terms):  # noqa: F811
    model, _ = _staged_model(data, tmp_path, wrapped(prompt, taps))
    model.feed_data(_mode_batch(['ct_denoise', 'derain', 'derain', 'deblur']))
    model.optimize_parameters(1)
    assert set(model.log_dict) == {'l_pix'} | terms
    if 'tasks' in prompt:
        logits = model.net_g.prompt_state.task_logits
        assert logits.shape == (4, 3)
    if prompt['type'] == 'ExplicitPrompt':  # the label picked the prompt
        assert torch.equal(model.net_g.prompt_state.prompt, model.net_g.prompt_mode.task_prompts.weight[[2, 0, 0, 1]])


def test_an_unlisted_batch_task_is_an_error_naming_it(tmp_path, data):  # noqa: F811
    model, _ = _staged_model(data, tmp_path, wrapped({'type': 'ExplicitPrompt', 'tasks': ['derain', 'deblur']}))
    model.feed_data(_mode_batch(['ct_denoise', 'derain']))
    with pytest.raises(ValueError, match=r"batch's task 'ct_denoise' is not in prompt.tasks \['derain', 'deblur'\]"):
        model.optimize_parameters(1)


@pytest.mark.slow
@pytest.mark.parametrize('backbone', ['EDSR', 'RRDBNet'])
def test_sequential_then_prompt_tuning_through_the_runner_and_resume(tmp_path, data, backbone):  # noqa: F811
    opt = options(data, f'stages_{backbone}', total_iter=8)
    opt['network_g'] = wrapped({'type': 'ExplicitPrompt', 'tasks': TASKS, 'width': 8})
    if backbone == 'RRDBNet':
        opt['network_g']['backbone'] = dict(type='RRDBNet', num_in_ch=3, num_out_ch=3, scale=1, num_feat=8,
                                            num_block=2, num_grow_ch=4)
        opt['network_g'].update(taps={}, inject_after=['body.1'])
    opt['train']['stages'] = [{'until_iter': 2, 'tasks': ['derain']}, {'until_iter': 4, 'tasks': ['derain', 'deblur']},
                              {'until_iter': 6, 'reset_optimizer': True}, {'freeze': ['backbone'], 'lr': 1e-3}]
    opt['logger']['save_checkpoint_freq'] = 5
    out = finish(train(tmp_path, write(tmp_path / 'o.yml', opt)))
    entered = re.findall(r'Training: entering stage (\d)/4, iters (\d+)-(\d+)', out)
    assert entered == [('1', '1', '2'), ('2', '3', '4'), ('3', '5', '6'), ('4', '7', '8')]
    assert re.search(r'stage 4/4, iters 7-8: tasks \[all\]; frozen: backbone; trainable parameters [\d,]+', out)
    assert 'l_cls' in out
    ckpt = torch.load(tmp_path / 'experiments' / opt['name'] / 'models' / 'net_g_latest.pth', weights_only=True)
    plan = ckpt['training_stages']
    assert [p['until_iter'] for p in plan] == [2, 4, 6, 8] and plan[3]['trainable_params'] < plan[0]['trainable_params']
    state = tmp_path / 'experiments' / opt['name'] / 'training_states' / '5.state'
    opt['path']['resume_state'] = str(state)
    out = finish(train(tmp_path, write(tmp_path / 'r.yml', opt)))
    assert re.search(r'Training: resuming in stage 3/4, iters 5-6', out)
    assert re.findall(r'Training: entering stage (\d)/4', out) == ['4']


SWINIR = dict(type='SwinIR', upscale=1, upsampler='', img_size=16, window_size=4, embed_dim=12, depths=[1, 1],
              num_heads=[2, 2], mlp_ratio=2)
MODES = {'ExplicitPrompt': ({'tasks': TASKS}, {'l_cls'}), 'AdaptivePrompt': ({}, set()),
         'LowRankPrompt': ({'tasks': TASKS, 'rank': 2}, {'l_cls', 'l_prompt_con'}),
         'DistributionPrompt': ({'prototypes': 3, 'query_dim': 8}, {'l_assign', 'l_kl'})}


@pytest.mark.slow
@pytest.mark.parametrize('backbone', ['EDSR', 'SwinIR'])
@pytest.mark.parametrize('mode', list(MODES))
def test_every_mode_trains_through_the_runner(tmp_path, data, mode, backbone):  # noqa: F811
    options_, terms = MODES[mode]
    opt = options(data, f'{mode}_{backbone}', total_iter=3)
    taps = {'task': 'body.0' if backbone == 'EDSR' else 'layers.0'} if mode == 'DistributionPrompt' else {}
    opt['network_g'] = wrapped({'type': mode, 'width': 8, **options_}, taps)
    if backbone == 'SwinIR':  # token sequences; any image size through padding
        opt['network_g'].update(backbone=dict(SWINIR), inject_after=['layers.1'], pad_multiple=4)
    out = finish(train(tmp_path, write(tmp_path / 'o.yml', opt)))
    logged = re.findall(r'iter:\s+3, lr.*?\] (.*)', out)[0]
    assert set(re.findall(r'(l_\w+):', logged)) == {'l_pix'} | terms
    assert re.search(r'Validation val_rain.*\n\s+# psnr: [\d.]+', out)


def test_loader_workers_see_a_stage_change_made_in_the_main_process(tmp_path, data):  # noqa: F811
    from basicsr.data import build_dataloader
    from basicsr.data.data_sampler import EnlargedSampler
    opt = _model_opt(data, tmp_path)['datasets']['train']
    opt.update(num_worker_per_gpu=1, batch_size_per_gpu=4, persistent_workers=True)
    dataset = build_dataset(opt)
    dataset.set_stage_tasks(['derain'])
    sampler = EnlargedSampler(dataset, num_replicas=1, rank=0, ratio=10)
    loader = build_dataloader(dataset, opt, num_gpu=0, dist=False, sampler=sampler, seed=0)
    assert loader.num_workers == 1 and loader.persistent_workers
    batches = iter(loader)
    assert all(set(next(batches)['task_name']) == {'derain'} for _ in range(3))
    dataset.set_stage_tasks(['deblur', 'ct_denoise'])
    later = [set(next(batches)['task_name']) for _ in range(6)]  # the first ones were prepared before the change
    assert later[-1] == {'deblur', 'ct_denoise'} and 'derain' not in set().union(*later[3:])
