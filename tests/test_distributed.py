"""Distributed training on the CPU: two gloo ranks started by torchrun (``--launcher pytorch``) train the project's
network on balanced multi-domain batches, stay identical, validate and save once, and auto-resume; two srun-like
tasks (``--launcher slurm``) join one process group. Each rank records itself through tests/ddp_worker.py."""
import json
import os
import re
import socket
import stat
import subprocess
import sys

import pytest
import torch
import yaml
from torch import distributed as dist

from datprl_arch.train import drop_local_rank_flag

from test_runners import NETWORK_G
from toy import write_pairs

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason='this torch build has no gloo backend')

TESTS = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(TESTS, 'ddp_worker.py')
RANKS = 2
BATCH_PER_RANK = 2
SUBPROCESS_TIMEOUT_S = 300
NCCL_FALLBACK = "dist_params.backend: 'nccl' cannot run on this machine (no CUDA device); using 'gloo'."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def cpu_env(**extra) -> dict:
    """The environment of a CPU-only child process (no GPU even where the machine has one)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', **extra)
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(name, None)
    return env


def source(name, dirs, domain):
    return dict(name=name, domain=domain, task='denoise', dataroot_gt=dirs[0], dataroot_lq=dirs[1],
                io_backend={'type': 'disk'})


def ddp_options(data):
    """Two sources of three pairs: 6 indices, so each rank's shard (3) holds one batch of 2 per epoch, where BasicSR
    counts ceil(6 / (2 * 2)) = 2 (P20). BasicSR's usual ``dist_params`` asks for nccl, which a CPU machine lacks."""
    sources = [source('natural', write_pairs(str(data / 'natural'), 3, (24, 24), seed=1), 'natural'),
               source('medical', write_pairs(str(data / 'medical'), 3, (24, 24), bit_depth=16, channels=1, seed=2),
                      'medical')]
    return dict(
        name='ddp', model_type='DATPRLModel', scale=1, num_gpu='auto', manual_seed=0,
        dist_params=dict(backend='nccl', port=29500),
        datasets=dict(
            train=dict(name='md_train', type='DATPRLMultiDomainDataset', datasets=sources, gt_size=16, use_hflip=True,
                       use_rot=True, num_worker_per_gpu=0, batch_size_per_gpu=BATCH_PER_RANK, dataset_enlarge_ratio=1),
            val=dict(name='md_val', type='DATPRLMultiDomainDataset', datasets=sources)),
        network_g=NETWORK_G, path=dict(pretrain_network_g=None, resume_state=None),
        train=dict(optim_g=dict(type='Adam', lr=1e-3, betas=[0.9, 0.99]),
                   scheduler=dict(type='MultiStepLR', milestones=[100], gamma=0.5),
                   total_iter=4, warmup_iter=-1, pixel_opt=dict(type='L1Loss', loss_weight=1.0)),
        val=dict(val_freq=2, save_img=False, suffix=None,
                 metrics=dict(psnr=dict(type='calculate_psnr', crop_border=0))),
        logger=dict(print_freq=1, save_checkpoint_freq=2, use_tb_logger=False))


def torchrun(record_dir, opt_file, cwd, *flags):
    """``torchrun --nproc_per_node=2`` (torch.distributed.run) of the worker with ``--launcher pytorch``."""
    os.makedirs(record_dir)
    args = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={RANKS}', '--master_addr=127.0.0.1',
            f'--master_port={free_port()}', WORKER, str(record_dir), '-opt', opt_file, '--launcher', 'pytorch', *flags]
    done = subprocess.run(args, cwd=cwd, env=cpu_env(), capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    records = [json.load(open(os.path.join(record_dir, f'rank{r}.json'))) for r in range(RANKS)]
    weights = [torch.load(os.path.join(record_dir, f'rank{r}.pth'), weights_only=True) for r in range(RANKS)]
    return done, records, weights


#: Top-k selections of one pool per iteration over both ranks (the usage window, 5000 iterations, spans the run).
SELECTIONS_PER_ITER = RANKS * BATCH_PER_RANK * NETWORK_G['degradation_top_k']


def usage_selections(state_file) -> int:
    """Task-pool selections in a training state's usage window."""
    return int(torch.load(state_file, weights_only=True)['objective_stats']['task'].sum())


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def saved_params(path):
    return torch.load(path, map_location='cpu', weights_only=True)['params']


def check_ranks(records, weights, iters, exp):
    """Both ranks trained ``iters`` on different balanced batches, ended identical to rank 0's latest checkpoint, and
    only rank 0 validated and wrote files."""
    for record in records:
        assert record['world_size'] == RANKS and record['iters'] == iters
        assert [sorted(batch['sources']) for batch in record['batches']] == [[0, 1]] * len(iters)  # one per source
    for first, second in zip(records[0]['batches'], records[1]['batches']):
        assert first['lq_sha1'] != second['lq_sha1']
    assert same(weights[0], weights[1])
    assert same(weights[0], saved_params(exp / 'models' / 'net_g_latest.pth'))
    assert same(weights[0], saved_params(exp / 'models' / f'net_g_{iters[-1]}.pth'))
    assert records[1]['validations'] == 0 and records[1]['saved'] == []


@pytest.mark.slow
def test_two_cpu_ranks_under_torchrun_train_identically_validate_once_and_resume(tmp_path):
    opt_file = str(tmp_path / 'train.yml')
    with open(opt_file, 'w') as f:
        yaml.safe_dump(ddp_options(tmp_path / 'data'), f, sort_keys=False)
    root = tmp_path / 'root'
    root.mkdir()
    exp = root / 'experiments' / 'ddp'

    # 4 iterations; validation at 2, 4 and after training, on rank 0 only; checkpoints at 2 and 4 from rank 0.
    first, records, weights = torchrun(tmp_path / 'first', opt_file, root)
    assert first.stderr.count(NCCL_FALLBACK) == RANKS
    assert 'An epoch has 1 full batch(es) per rank (the last partial one is dropped): total epochs raised from 2 ' \
           'to 4 so training reaches iter 4.' in first.stderr
    check_ranks(records, weights, [1, 2, 3, 4], exp)
    assert records[0]['validations'] == 3
    assert records[0]['saved'] == ['net_g_2.pth', '2.state', 'net_g_4.pth', '4.state', 'net_g_latest.pth']
    assert not same(saved_params(exp / 'models' / 'net_g_2.pth'), weights[0])
    assert len(re.findall(r'INFO: Validation md_val\n', first.stderr)) == 3
    assert usage_selections(exp / 'training_states' / '4.state') == 4 * SELECTIONS_PER_ITER  # both ranks', once

    # --auto_resume under torchrun: both ranks continue from rank 0's state at iter 4 (epoch 3) up to 6.
    second, records, weights = torchrun(tmp_path / 'second', opt_file, root, '--auto_resume',
                                        '--force_yml', 'train:total_iter=6')
    assert 'INFO: Resuming training from epoch: 3, iter: 4.' in second.stderr
    assert 'INFO: Start training from epoch: 3, iter: 4\n' in second.stderr
    check_ranks(records, weights, [5, 6], exp)
    assert records[0]['saved'] == ['net_g_6.pth', '6.state', 'net_g_latest.pth']
    assert sorted(os.listdir(exp / 'training_states')) == ['2.state', '4.state', '6.state']
    assert usage_selections(exp / 'training_states' / '6.state') == 6 * SELECTIONS_PER_ITER
    assert os.listdir(root / 'experiments') == ['ddp']


SLURM_TASK = '''
import json, os
import datprl_arch
import basicsr.train
import torch
from torch import distributed as dist
opt, _ = basicsr.train.parse_options(os.getcwd(), is_train=True)
total = torch.tensor([opt['rank'] + 1.0])
dist.all_reduce(total)
env = {k: os.environ[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
timeout = dist.distributed_c10d._get_default_group()._get_backend(torch.device('cpu')).options._timeout
print(json.dumps(dict(env, rank=opt['rank'], world_size=opt['world_size'], backend=dist.get_backend(),
                      total=total.item(), timeout_s=timeout.total_seconds())))
dist.destroy_process_group()
'''


def fake_scontrol(folder) -> str:
    """A ``scontrol`` that expands ``show hostnames node[01-02]`` (the first "host" is this machine's loopback)."""
    folder.mkdir()
    script = folder / 'scontrol'
    script.write_text('#!/bin/sh\n[ "$*" = "show hostnames node[01-02]" ] || exit 1\nprintf "127.0.0.1\\nnode02\\n"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(folder)


@pytest.mark.slow
def test_two_slurm_tasks_join_one_gloo_group_with_basicsr_dist_params(tmp_path):
    port = free_port()
    opt_file = tmp_path / 'slurm.yml'
    opt_file.write_text(yaml.safe_dump(dict(ddp_options(tmp_path / 'data'), name='slurm',  # a whole valid file
                                            dist_params=dict(backend='nccl', port=port, timeout=5400))))
    path = fake_scontrol(tmp_path / 'bin') + os.pathsep + os.environ['PATH']
    tasks = [subprocess.Popen([sys.executable, '-c', SLURM_TASK, '-opt', str(opt_file), '--launcher', 'slurm'],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=cpu_env(PATH=path, SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_NTASKS='2',
                                          SLURM_NODELIST='node[01-02]'))
             for r in range(RANKS)]
    outputs = [task.communicate(timeout=SUBPROCESS_TIMEOUT_S) for task in tasks]
    for task, (out, err) in zip(tasks, outputs):
        assert task.returncode == 0, err[-3000:]
        assert NCCL_FALLBACK in err
    reports = [json.loads(out.splitlines()[-1]) for out, _ in outputs]
    for r, report in enumerate(reports):
        assert report == dict(RANK=str(r), WORLD_SIZE='2', LOCAL_RANK=str(r), MASTER_ADDR='127.0.0.1',
                              MASTER_PORT=str(port), rank=r, world_size=2, backend='gloo', total=3.0,
                              timeout_s=5400.0)


def test_local_rank_flag_of_torch_distributed_launch_is_dropped(monkeypatch):
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    argv = ['train.py', '--local-rank=1', '-opt', 'x.yml', '--launcher', 'pytorch']
    assert drop_local_rank_flag(argv) == ['train.py', '-opt', 'x.yml', '--launcher', 'pytorch']
    assert os.environ['LOCAL_RANK'] == '1'
    monkeypatch.setenv('LOCAL_RANK', '0')  # exported by the launcher: it wins
    assert drop_local_rank_flag(['t', '--local-rank', '3', '--local_rank=0']) == ['t', '--local_rank=0']
    assert os.environ['LOCAL_RANK'] == '0'
