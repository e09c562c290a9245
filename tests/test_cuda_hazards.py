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

from test_distributed import NCCL_FALLBACK, SLURM_TASK, SUBPROCESS_TIMEOUT_S, cpu_env, ddp_options, free_port
from test_training import NETWORK, _batch, _model_opt, data  # noqa: F401  (data: the module's fixture)

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
