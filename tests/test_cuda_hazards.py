"""Hazards of the second CUDA review (shared/reviews/cuda_paths_2.md), checked on the CPU: ``--force_yml`` reaching
the process group (H4), every prompt mode under 1-rank gloo DDP with its loss weights at 0 (H3), tiled validation of
large images (H5), the EMA update with ``torch._foreach_lerp_`` (H13) and opt-in TF32 (H11)."""
import json
import subprocess
import sys

import pytest
import torch
import yaml
from torch import distributed as dist

import datprl_arch  # noqa: F401  (registration)
from basicsr.models import build_model
from datprl_arch.inference.tiling import plan_tiles
from datprl_arch.inference.whole_image import min_tiled_pixels, prompt_view
from datprl_arch.options import OptionFileError
from datprl_arch.options_schema import validate
from datprl_arch.utils import precision

from test_distributed import NCCL_FALLBACK, SLURM_TASK, SUBPROCESS_TIMEOUT_S, cpu_env, ddp_options, free_port
from test_training import NETWORK, _batch, _model_opt, data, options  # noqa: F401  (data: the module's fixture)

gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                          reason='this torch build has no gloo backend')

#: What the option file asks for, and what the command line's --force_yml overrides it with.
FILE_DIST_PARAMS = dict(backend='nccl', port=29500, timeout=7200)
FORCED_TIMEOUT_S = 60


def _one_rank_env(launcher: str, port: int) -> dict:
    """One rank's environment: what torchrun --nproc_per_node=1 exports, or srun with one task."""
    env = cpu_env()
    if launcher == 'pytorch':
        env.update(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    else:
        env.update(SLURM_PROCID='0', SLURM_LOCALID='0', SLURM_NTASKS='1', SLURM_NODELIST='n1', MASTER_ADDR='127.0.0.1')
    return env


@gloo
@pytest.mark.parametrize('launcher', ['pytorch', 'slurm'])
@pytest.mark.parametrize('forced', [['num_gpu=0'], ['dist_params:backend=gloo']])
def test_force_yml_num_gpu_and_dist_params_reach_the_process_group(tmp_path, launcher, forced):
    """basicsr starts the process group before it applies --force_yml; the overrides must reach it all the same:
    gloo (asked for, or because num_gpu=0 keeps the run on the CPU) with no nccl fall-back, the forced timeout and,
    for srun, the forced port."""
    port = free_port()
    opt_file = tmp_path / 'o.yml'
    opt_file.write_text(yaml.safe_dump(dict(ddp_options(tmp_path / 'data'), dist_params=FILE_DIST_PARAMS)))
    entries = [*forced, f'dist_params:timeout={FORCED_TIMEOUT_S}', f'dist_params:port={port}']
    done = subprocess.run([sys.executable, '-c', SLURM_TASK, '-opt', str(opt_file), '--launcher', launcher,
                           '--force_yml', *entries], cwd=tmp_path, env=_one_rank_env(launcher, port),
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert NCCL_FALLBACK not in done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report['backend'] == 'gloo' and report['timeout_s'] == FORCED_TIMEOUT_S
    assert report['world_size'] == 1 and report['MASTER_PORT'] == str(port)


# ---------------------------------------------------------------------------------------------- prompt modes, DDP
DDP_STEPS = 3
TASKS = ['derain', 'deblur', 'ct_denoise']  # the tasks of test_training's batches
EDSR = dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=8, num_block=2, upscale=1)
#: mode -> its options with every loss weight at 0
ZERO_WEIGHT_MODES = {
    'ExplicitPrompt': dict(tasks=TASKS, width=8, classifier_weight=0),
    'AdaptivePrompt': dict(width=8),
    'LowRankPrompt': dict(tasks=TASKS, width=8, rank=2, classifier_weight=0, contrastive_weight=0),
    'DistributionPrompt': dict(width=8, prototypes=3, query_dim=8, top_k=2, assignment_weight=0, kl_weight=0),
}
#: The pools' own losses at 0 (DATPRLRestormer's prompt system).
ZERO_POOL_WEIGHTS = dict(prompt_diversity_weight=0, prompt_balance_weight=0, prompt_contrastive_weight=0,
                         clip_alignment_weight=0)


def _prompted_edsr(mode: str) -> dict:
    taps = {'task': 'body.0'} if mode == 'DistributionPrompt' else {}
    return dict(type='PromptedBackbone', backbone=dict(EDSR), taps=taps, inject_after=['body.1'], probe_size=16,
                prompt=dict(type=mode, **ZERO_WEIGHT_MODES[mode]))


@pytest.fixture
def one_gloo_rank():
    """A 1-rank gloo process group in this process for the test's duration."""
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{free_port()}', rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@gloo
@pytest.mark.parametrize('mode', [*ZERO_WEIGHT_MODES, 'pools'])
def test_every_prompt_mode_trains_under_ddp_with_its_loss_weights_at_0(tmp_path, data, one_gloo_rank,  # noqa: F811
                                                                       mode):
    """With a weight at 0 some parameters get no gradient; DDP (find_unused_parameters: false) then fails at the
    second step unless they are frozen or not run (H3)."""
    opt = _model_opt(data, tmp_path, **(ZERO_POOL_WEIGHTS if mode == 'pools' else {}))
    opt['dist'] = True
    if mode != 'pools':
        opt['network_g'] = _prompted_edsr(mode)
    model = build_model(opt)
    assert isinstance(model.net_g, torch.nn.parallel.DistributedDataParallel)
    before = {k: v.clone() for k, v in model.get_bare_model(model.net_g).state_dict().items()}
    for step in range(1, DDP_STEPS + 1):
        batch = _batch(opt)
        batch['task_name'] = [TASKS[int(t)] for t in batch['task']]
        model.feed_data(batch)
        model.optimize_parameters(step)
        assert model.nonfinite_steps == 0
    after = model.get_bare_model(model.net_g).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    model.test()  # validation (rank 0): ExplicitPrompt's untrained classifier is not asked, the labels choose
    assert model.output.shape == batch['gt'].shape


# ---------------------------------------------------------------------------------------------- large validation images
MAX_PIXELS = 4096  # automatic tiles of 64 pixels, overlap 32 (the restore command's)
LARGE = (1, 3, 96, 160)  # 15,360 pixels: 2 x 4 tiles


def _tested(tmp_path, data, network, max_pixels):  # noqa: F811
    opt = _model_opt(data, tmp_path)
    opt['network_g'] = network
    opt['val']['max_pixels'] = max_pixels
    torch.manual_seed(0)
    return build_model(opt)


def _tile_inputs(model):
    """Record the input shape of every forward of the tested network."""
    shapes = []
    model._tested_net().register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape[-2:])))
    return shapes


@pytest.mark.parametrize('prompted', [False, True])
def test_validation_tiles_an_image_above_val_max_pixels_and_equals_the_untiled_result(
        tmp_path, data, prompted):  # noqa: F811
    """EDSR's receptive field (radius 7) fits the discarded seam margin (a quarter of the overlap), so the tiles
    give the untiled output everywhere; a prompted network runs every tile under the whole image's prompt."""
    network = _prompted_edsr('AdaptivePrompt') if prompted else dict(EDSR)
    lq = torch.rand(LARGE, generator=torch.Generator().manual_seed(3))
    tiled = _tested(tmp_path / 'tiled', data, network, MAX_PIXELS)
    whole = _tested(tmp_path / 'whole', data, network, None)
    whole._tested_net().load_state_dict(tiled._tested_net().state_dict())
    shapes = _tile_inputs(tiled)
    net = tiled._tested_net()
    prompts = []
    if prompted:
        net.register_forward_pre_hook(lambda module, args: prompts.append(module._fixed_prompt))
    tiled.lq = whole.lq = lq
    tiled.test()
    if prompted:  # the untiled reference runs under the prompt the tiles shared: that of the whole image
        shared = prompts[-1]  # the first forward composed it (compute_prompt), without a fixed prompt
        assert prompts[0] is None and shared is not None and all(p is shared for p in prompts[1:])
        with torch.no_grad():
            assert torch.equal(shared, net.compute_prompt(prompt_view(lq, MAX_PIXELS)))
        with whole._tested_net().fixed_prompt(shared):
            whole.test()
    else:
        whole.test()
    assert shapes.count((64, 64)) == len(plan_tiles(*LARGE[-2:], 64, 32)) == 8
    assert whole.output.shape == tiled.output.shape == LARGE
    torch.testing.assert_close(tiled.output, whole.output, rtol=1e-5, atol=1e-5)


def test_val_max_pixels_and_train_tf32_are_checked_with_the_options(data):  # noqa: F811
    opt = options(data, 'checked', tf32='yes')
    opt['val']['max_pixels'] = 100
    with pytest.raises(OptionFileError) as error:
        validate(opt, True, 'o.yml')
    assert f'val.max_pixels: found int 100, expected an integer >= {min_tiled_pixels()}' in str(error.value)
    assert "train.tf32: found the string 'yes', expected true or false" in str(error.value)
    opt = options(data, 'checked', tf32=True)
    opt['val']['max_pixels'] = MAX_PIXELS
    validate(opt, True, 'o.yml')


# ---------------------------------------------------------------------------------------------- EMA and TF32
def test_the_ema_update_is_one_foreach_lerp_equal_to_the_loop_it_replaced(tmp_path, data, monkeypatch):  # noqa
    model = build_model(_model_opt(data, tmp_path))
    net = model.get_bare_model(model.net_g)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn_like(param))
    reference = {name: param.detach().clone() for name, param in model.net_g_ema.named_parameters()}
    calls = []
    lerp = torch._foreach_lerp_
    monkeypatch.setattr(torch, '_foreach_lerp_', lambda *args: calls.append(len(args[0])) or lerp(*args))
    decay = 0.9
    for _ in range(3):
        model.model_ema(decay)
        for name, param in net.named_parameters():  # the loop model_ema ran before
            reference[name].mul_(decay).add_(param.detach(), alpha=1 - decay)
    assert calls == [len(reference)] * 3
    for name, param in model.net_g_ema.named_parameters():  # lerp rounds differently: equal to float32 precision
        torch.testing.assert_close(param, reference[name])


def test_tf32_is_opt_in_and_cuda_only(tmp_path, data, monkeypatch):  # noqa: F811
    precisions = []
    monkeypatch.setattr(torch, 'set_float32_matmul_precision', precisions.append)
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    assert precision.use_tf32(torch.device('cpu')).startswith('tf32: CUDA only')
    assert precisions == [] and torch.backends.cudnn.allow_tf32 is False
    precision.use_tf32(torch.device('cuda'))
    assert precisions == ['high'] and torch.backends.cudnn.allow_tf32 is True
    build_model(_model_opt(data, tmp_path / 'off'))
    assert precisions == ['high']  # without train.tf32 nothing is set


def test_restore_and_benchmark_take_tf32_and_the_benchmark_max_pixels():
    from datprl_arch import benchmark, restore
    assert restore.build_parser().parse_args(['in.png', 'out/', '--tf32']).tf32
    args = benchmark.parse_args(['-opt', 'test.yml', '--tf32', '--max-pixels', str(MAX_PIXELS)])
    assert args.tf32 and args.max_pixels == MAX_PIXELS
