"""datprl_arch._compat: each basicsr 1.4.2 breakage is shown with basicsr's own code, then shown fixed."""
import datetime
import importlib
import json
import os
import re
import runpy
import subprocess
import sys
from collections import Counter

import cv2
import lmdb
import pytest
import torch

import basicsr
import basicsr.data
import basicsr.test
import basicsr.train
from datprl_arch import _compat, options
from basicsr.data import build_dataset
from basicsr.models.lr_scheduler import MultiStepRestartLR
from basicsr.utils import options as basicsr_options
from basicsr.utils.file_client import FileClient, LmdbBackend
from basicsr.utils.lmdb_util import make_lmdb_from_imgs
from datprl_arch.utils.checkpoint import CheckpointError

from conftest import write_png_pairs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LMDB_MAP_SIZE = 1 << 24


# P1 / P21: imports ---------------------------------------------------------------------------------------------------

def test_p1_functional_tensor_alias_lets_basicsr_import(monkeypatch):
    name = 'torchvision.transforms.functional_tensor'
    monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, 'basicsr.data.degradations')
    monkeypatch.setattr(basicsr.data, 'degradations', basicsr.data.degradations)
    with pytest.raises(ModuleNotFoundError, match='functional_tensor'):
        importlib.import_module('basicsr.data.degradations')

    _compat._alias_functional_tensor()
    degradations = importlib.import_module('basicsr.data.degradations')
    from torchvision.transforms.functional import rgb_to_grayscale
    img = torch.rand(2, 3, 8, 8)
    assert torch.equal(degradations.rgb_to_grayscale(img), rgb_to_grayscale(img))


def test_p21_scipy_ndimage_filters_alias_once_scipy_removes_it(monkeypatch):
    import scipy.ndimage
    monkeypatch.setitem(sys.modules, 'scipy.ndimage.filters', None)  # as after the removal in SciPy 2
    with pytest.raises(ImportError):
        importlib.import_module('scipy.ndimage.filters')
    _compat._alias_scipy_ndimage_filters()
    from scipy.ndimage.filters import convolve
    assert convolve is scipy.ndimage.convolve


# P2 / P3: resume ------------------------------------------------------------------------------------------------------

@pytest.fixture
def run_root(tmp_path):
    """A run root with BasicSR-style training states at iterations 2 and 4 (Adam + MultiStepRestartLR)."""
    root = tmp_path / 'root'
    states = root / 'experiments' / 'exp' / 'training_states'
    states.mkdir(parents=True)
    net = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    scheduler = MultiStepRestartLR(optimizer, milestones=[3])
    (root / 'experiments' / 'exp' / 'models').mkdir()
    for it in (2, 4):
        torch.save({'epoch': 1, 'iter': it, 'optimizers': [optimizer.state_dict()],
                    'schedulers': [scheduler.state_dict()]}, states / f'{it}.state')
        torch.save({'params': net.state_dict()}, root / 'experiments' / 'exp' / 'models' / f'net_g_{it}.pth')
    (states / 'notes.state.bak').write_text('not a state')
    return root


def resume_opt(root, auto_resume, resume_state=None):
    exp = os.path.join(root, 'experiments', 'exp')
    return {'name': 'exp', 'auto_resume': auto_resume, 'root_path': str(root), 'network_g': {'type': 'X'},
            'path': {'resume_state': resume_state, 'training_states': os.path.join(exp, 'training_states'),
                     'models': os.path.join(exp, 'models')}}


def test_p3_auto_resume_finds_the_runs_states_from_any_directory(run_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the run root
    assert basicsr.train.load_resume_state.basicsr_original(resume_opt(run_root, True)) is None  # basicsr: start over

    opt = resume_opt(run_root, True)
    state = basicsr.train.load_resume_state(opt)
    assert state['iter'] == 4 and isinstance(state['schedulers'][0]['milestones'], Counter)
    assert state['optimizers'][0]['state'][0]['exp_avg'].device.type == 'cpu'
    assert opt['path']['resume_state'] == str(run_root / 'experiments/exp/training_states/4.state')
    assert opt['path']['pretrain_network_g'] == str(run_root / 'experiments/exp/models/net_g_4.pth')


@pytest.mark.skipif(torch.cuda.is_available(), reason='the CUDA-only basicsr loader works where CUDA exists')
def test_p2_resume_state_loads_on_a_machine_without_cuda(run_root, monkeypatch):
    monkeypatch.chdir(run_root)
    with pytest.raises((RuntimeError, AssertionError)):
        basicsr.train.load_resume_state.basicsr_original(resume_opt(run_root, True))

    relative = os.path.join('experiments', 'exp', 'training_states', '2.state')
    state = basicsr.train.load_resume_state(resume_opt(run_root, False, relative))
    assert state['iter'] == 2


def test_resume_state_relative_to_the_run_root_and_missing_file(run_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    opt = resume_opt(run_root, False, 'experiments/exp/training_states/2.state')
    assert basicsr.train.load_resume_state(opt)['iter'] == 2
    assert opt['path']['resume_state'] == str(run_root / 'experiments/exp/training_states/2.state')
    with pytest.raises(FileNotFoundError, match=r"path.resume_state: training state '.*/9.state' does not exist"):
        basicsr.train.load_resume_state(resume_opt(run_root, False, 'experiments/exp/training_states/9.state'))
    assert basicsr.train.load_resume_state(resume_opt(run_root, False)) is None
    assert basicsr.train.load_resume_state(resume_opt(tmp_path / 'fresh', True)) is None


def test_resume_refuses_pickled_code_in_a_state_file(run_root):
    path = run_root / 'experiments/exp/training_states/6.state'
    torch.save({'epoch': 1, 'iter': 6, 'optimizers': [], 'schedulers': [], 'hook': os.system}, path)
    refused = f'cannot read training state {path} with weights_only=True (it holds the Python object posix.system'
    with pytest.raises(CheckpointError, match=re.escape(refused)):  # named, never run
        basicsr.train.load_resume_state(resume_opt(run_root, False, str(path)))
    assert basicsr.train.load_resume_state(resume_opt(run_root, True))['iter'] == 4  # --auto_resume skips it


# P4: LMDB shared per process -----------------------------------------------------------------------------------------

def make_lmdb(folder, lmdb_path):
    names = sorted(os.listdir(folder))
    make_lmdb_from_imgs(folder, lmdb_path, names, [n[:-len('.png')] for n in names], map_size=LMDB_MAP_SIZE)
    return lmdb_path


@pytest.fixture
def lmdbs(tmp_path):
    """GT LMDB shared by two LQ LMDBs (e.g. one clean test set at two noise levels), and the source folders."""
    gt_dir, lq_dir = write_png_pairs(str(tmp_path / 'a'), count=3, size=16, seed=1)
    _, lq2_dir = write_png_pairs(str(tmp_path / 'b'), count=3, size=16, seed=2)
    return dict(gt=make_lmdb(gt_dir, str(tmp_path / 'gt.lmdb')), lq=make_lmdb(lq_dir, str(tmp_path / 'lq.lmdb')),
                lq2=make_lmdb(lq2_dir, str(tmp_path / 'lq2.lmdb')), gt_dir=gt_dir, lq2_dir=lq2_dir)


def paired_lmdb_dataset(name, gt, lq, phase='val'):
    opt = dict(name=name, type='PairedImageDataset', phase=phase, scale=1, dataroot_gt=gt, dataroot_lq=lq,
               io_backend={'type': 'lmdb'})
    if phase == 'train':
        opt.update(gt_size=16, use_hflip=False, use_rot=False)
    return build_dataset(opt)


def as_png(tensor):
    return (tensor.permute(1, 2, 0).numpy()[..., ::-1] * 255).round().astype('uint8')


def test_p4_basicsr_lmdb_backend_cannot_open_one_lmdb_twice(lmdbs):
    first = LmdbBackend(db_paths=[lmdbs['gt']], client_keys=['gt'])
    try:
        with pytest.raises(lmdb.Error, match='already open'):
            LmdbBackend(db_paths=[lmdbs['gt']], client_keys=['gt'])
    finally:
        first._client['gt'].close()
    assert FileClient._backends['lmdb'] is _compat.SharedLmdbBackend
    assert _compat.SharedLmdbBackend.basicsr_original is LmdbBackend


def test_p4_datasets_share_a_gt_lmdb_and_validate_on_the_training_lmdb(lmdbs):
    train = paired_lmdb_dataset('train', lmdbs['gt'], lmdbs['lq'], phase='train')
    val_on_train = paired_lmdb_dataset('val_on_train', lmdbs['gt'], lmdbs['lq'])
    second_noise_level = paired_lmdb_dataset('test_b', lmdbs['gt'], lmdbs['lq2'])
    for i in range(3):
        gt = cv2.imread(os.path.join(lmdbs['gt_dir'], f'img{i:02d}.png'))
        for sample in (train[i], val_on_train[i], second_noise_level[i]):
            assert (as_png(sample['gt']) == gt).all()
        lq2 = cv2.imread(os.path.join(lmdbs['lq2_dir'], f'img{i:02d}.png'))
        assert (as_png(second_noise_level[i]['lq']) == lq2).all()


class WithEnvOwner(torch.utils.data.Dataset):
    """Wraps a dataset; each sample also says whether the shared LMDB environment belongs to the reading process."""

    def __init__(self, dataset, lmdb_path):
        self.dataset, self.key = dataset, os.path.realpath(lmdb_path)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        sample = self.dataset[index]
        return sample['lq'], _compat._LMDB_ENVS[self.key][0] == os.getpid()


def test_p4_forked_dataloader_workers_reopen_the_environment(lmdbs):
    dataset = WithEnvOwner(paired_lmdb_dataset('val', lmdbs['gt'], lmdbs['lq2']), lmdbs['lq2'])
    expected = torch.stack([dataset[i][0] for i in range(3)])  # the parent opens the environment first
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, multiprocessing_context='fork')
    batches = list(loader)
    assert torch.equal(torch.cat([lq for lq, _ in batches]), expected)
    assert all(owned.item() for _, owned in batches)


def test_p4_an_lmdb_rebuilt_at_the_same_path_is_reopened(lmdbs, tmp_path):
    before = paired_lmdb_dataset('v1', lmdbs['gt'], lmdbs['lq'])[0]['lq']
    os.rename(lmdbs['lq'], str(tmp_path / 'old.lmdb'))
    make_lmdb(lmdbs['lq2_dir'], lmdbs['lq'])
    after = paired_lmdb_dataset('v2', lmdbs['gt'], lmdbs['lq'])[0]['lq']
    assert not torch.equal(before, after)
    assert (as_png(after) == cv2.imread(os.path.join(lmdbs['lq2_dir'], 'img00.png'))).all()


def test_p4_missing_lmdb_is_named(tmp_path):
    missing = str(tmp_path / 'nope.lmdb')
    with pytest.raises(FileNotFoundError, match=f"LMDB '{re.escape(missing)}' does not exist"):
        FileClient('lmdb', db_paths=[missing], client_keys=['gt'])


# P12: distributed training without CUDA (the two-process runs are in test_distributed.py) -----------------------------

TORCHRUN_VARIABLES = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')
SLURM_VARIABLES = ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST', 'SLURM_LOCALID')


@pytest.fixture
def clean_dist_env(monkeypatch):
    """No launcher variables and no ``-opt`` on the command line; whatever a test exports is undone afterwards."""
    for name in TORCHRUN_VARIABLES + SLURM_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, 'argv', ['train.py'])
    return monkeypatch


@pytest.mark.skipif(torch.cuda.is_available(), reason='basicsr divides by the CUDA device count, non-zero here')
def test_p12_basicsr_pytorch_launcher_divides_by_the_gpu_count(clean_dist_env):
    from basicsr.utils.dist_util import _init_dist_pytorch
    clean_dist_env.setenv('RANK', '0')
    with pytest.raises(ZeroDivisionError):
        _init_dist_pytorch('nccl')
    assert basicsr_options.init_dist is _compat.init_dist
    assert _compat.init_dist.basicsr_original.__module__ == 'basicsr.utils.dist_util'


def test_p12_backend_is_nccl_with_cuda_gloo_without_or_a_usable_request(monkeypatch):
    from torch import distributed as dist
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert _compat.dist_backend() == 'gloo'
    assert _compat.dist_backend('GLOO') == 'gloo'
    assert _compat.dist_backend('cpu:gloo') == 'cpu:gloo'  # device maps go to torch unchanged
    with pytest.warns(RuntimeWarning, match=re.escape("dist_params.backend: 'nccl' cannot run on this machine "
                                                      "(no CUDA device); using 'gloo'.")):
        assert _compat.dist_backend('nccl') == 'gloo'
    monkeypatch.setattr(dist, 'is_mpi_available', lambda: False)
    with pytest.warns(RuntimeWarning, match="'mpi' cannot run on this machine .not built into this torch.; using"):
        assert _compat.dist_backend('mpi') == 'gloo'
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(dist, 'is_nccl_available', lambda: True)
    assert _compat.dist_backend() == 'nccl' and _compat.dist_backend('gloo') == 'gloo'


def test_p12_launchers_outside_torchrun_or_srun_say_what_is_missing(clean_dist_env):
    with pytest.raises(RuntimeError, match=re.escape(
            '--launcher pytorch: environment variable(s) RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set; start '
            'the processes with torchrun, e.g. `torchrun --nproc_per_node=2 -m datprl_arch.train')):
        _compat.init_dist('pytorch')
    clean_dist_env.setenv('SLURM_PROCID', '0')
    with pytest.raises(RuntimeError, match=re.escape('--launcher slurm: environment variable(s) SLURM_NTASKS, '
                                                     'SLURM_NODELIST not set; start one task per GPU')):
        _compat.init_dist('slurm')
    with pytest.raises(ValueError, match="--launcher 'mpirun': expected 'pytorch' .torchrun. or 'slurm' .srun.."):
        _compat.init_dist('mpirun')


def test_p12_slurm_variables_become_torch_variables(clean_dist_env, tmp_path):
    clean_dist_env.setenv('PATH', str(tmp_path))  # no scontrol
    for name, value in dict(SLURM_PROCID='5', SLURM_NTASKS='8', SLURM_NODELIST='gpu[1-2]', SLURM_LOCALID='1',
                            MASTER_ADDR='10.0.0.7', MASTER_PORT='4321').items():
        clean_dist_env.setenv(name, value)
    _compat._export_slurm_env(port=None)
    assert {k: os.environ[k] for k in TORCHRUN_VARIABLES} == dict(
        RANK='5', WORLD_SIZE='8', LOCAL_RANK='1', MASTER_ADDR='10.0.0.7', MASTER_PORT='4321')
    _compat._export_slurm_env(port=29600)  # dist_params.port wins over MASTER_PORT
    assert os.environ['MASTER_PORT'] == '29600'
    clean_dist_env.delenv('MASTER_ADDR')
    with pytest.raises(RuntimeError, match=re.escape("cannot expand SLURM_NODELIST='gpu[1-2]' with scontrol")):
        _compat._export_slurm_env(port=None)


def test_p12_each_process_takes_the_gpu_of_its_local_rank(clean_dist_env):
    chosen = []
    clean_dist_env.setattr(torch.cuda, 'device_count', lambda: 2)
    clean_dist_env.setattr(torch.cuda, 'set_device', chosen.append)
    clean_dist_env.setenv('RANK', '5')
    _compat._set_cuda_device()  # no LOCAL_RANK: RANK modulo the GPUs, as basicsr does
    clean_dist_env.setenv('LOCAL_RANK', '0')
    _compat._set_cuda_device()
    assert chosen == [1, 0]
    clean_dist_env.setenv('LOCAL_RANK', '2')
    clean_dist_env.setenv('CUDA_VISIBLE_DEVICES', '0,1')
    with pytest.raises(RuntimeError, match=re.escape("local rank 2 has no GPU: 2 CUDA device(s) are visible "
                                                     "(CUDA_VISIBLE_DEVICES='0,1'); start at most 2 processes")):
        _compat._set_cuda_device()


def test_p12_torchrun_runs_read_dist_params_backend_from_the_option_file(clean_dist_env, tmp_path):
    assert options.command_line_dist_backend() is None
    opt_file = tmp_path / 'x.yml'
    opt_file.write_text('name: x\ndist_params:\n  backend: gloo\n  port: 29500\n')
    clean_dist_env.setattr(sys, 'argv', ['train.py', '-opt', str(opt_file), '--launcher', 'pytorch'])
    assert options.command_line_dist_backend() == 'gloo'
    opt_file.write_text('name: x\n')
    assert options.command_line_dist_backend() is None
    opt_file.write_text('name: x\ndist_params: nccl\n')
    with pytest.raises(options.OptionFileError, match="x.yml: dist_params must be a mapping .backend: ..., port: "
                                                      "...., found 'nccl'."):
        options.command_line_dist_backend()


@pytest.mark.skipif(torch.cuda.is_available(), reason='basicsr gives DDP the current CUDA device, which exists here')
def test_p12_cpu_network_is_wrapped_in_ddp_without_device_ids(tmp_path):
    from types import SimpleNamespace

    from torch import distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from basicsr.models.base_model import BaseModel

    model = SimpleNamespace(opt={'dist': True, 'num_gpu': 0, 'find_unused_parameters': True},
                            device=torch.device('cpu'))
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    try:
        with pytest.raises((AssertionError, RuntimeError)):
            BaseModel.model_to_device.basicsr_original(model, torch.nn.Linear(2, 2))
        net = BaseModel.model_to_device(model, torch.nn.Linear(2, 2))
        assert isinstance(net, DistributedDataParallel) and net.device_ids is None and net.find_unused_parameters
        net(torch.ones(3, 2)).sum().backward()
        assert net.module.weight.grad.shape == (2, 2)
        model.opt['find_unused_parameters'] = False
        assert not BaseModel.model_to_device(model, torch.nn.Linear(2, 2)).find_unused_parameters
    finally:
        dist.destroy_process_group()
    model.opt['dist'] = False
    plain = torch.nn.Linear(2, 2)
    assert BaseModel.model_to_device(model, plain) is plain


# P20: the epoch count -------------------------------------------------------------------------------------------------

class ListLogger:
    def __init__(self):
        self.lines = []

    def info(self, message):
        self.lines.append(message)


def epoch_opt(root, count, world_size=2, total_iter=8):
    gt, lq = write_png_pairs(str(root), count=count, size=16)
    train = dict(name='pairs', type='PairedImageDataset', phase='train', scale=1, dataroot_gt=gt, dataroot_lq=lq,
                 io_backend={'type': 'disk'}, gt_size=16, use_hflip=False, use_rot=False, batch_size_per_gpu=2,
                 num_worker_per_gpu=0, dataset_enlarge_ratio=1)
    return dict(datasets={'train': train}, world_size=world_size, rank=0, num_gpu=0, dist=True, manual_seed=0,
                train={'total_iter': total_iter})


def iterations(loader, total_epochs):
    """Iterations ``train_pipeline`` reaches: it runs epochs ``0 .. total_epochs``."""
    return (total_epochs + 1) * len(loader)


def test_p20_epochs_are_counted_from_the_batches_each_rank_really_gets(tmp_path):
    opt = epoch_opt(tmp_path / 'five', count=5)  # 2 ranks: 3 samples each, 1 full batch of 2; basicsr counts 2
    loader, _, _, total_epochs, total_iters = basicsr.train.create_train_val_dataloader.basicsr_original(
        opt, ListLogger())
    assert (total_epochs, total_iters, len(loader)) == (4, 8, 1) and iterations(loader, total_epochs) == 5

    logger = ListLogger()
    loader, _, _, total_epochs, _ = basicsr.train.create_train_val_dataloader(opt, logger)
    assert total_epochs == 8 and iterations(loader, total_epochs) >= 8
    assert logger.lines[-1] == ('An epoch has 1 full batch(es) per rank (the last partial one is dropped): total '
                                'epochs raised from 4 to 8 so training reaches iter 8.')

    opt = epoch_opt(tmp_path / 'eight', count=8)  # counted right: unchanged
    assert basicsr.train.create_train_val_dataloader(opt, logger)[3] == 4


def test_p20_a_rank_shard_smaller_than_one_batch_is_an_error(tmp_path):
    opt = epoch_opt(tmp_path / 'two', count=2)
    with pytest.raises(ValueError, match=re.escape(
            'datasets.train: each of the 2 rank(s) gets 1 sample(s) per epoch, fewer than batch_size_per_gpu: 2, '
            'so no batch would ever be drawn. Raise dataset_enlarge_ratio')):
        basicsr.train.create_train_val_dataloader(opt, ListLogger())


# Installation, idempotency, version guard, logger ------------------------------------------------------------------

def installed():
    from basicsr.models.base_model import BaseModel
    return (basicsr.train.load_resume_state, basicsr.train.parse_options, basicsr.test.parse_options,
            basicsr_options.ordered_yaml, FileClient._backends['lmdb'], basicsr_options.init_dist,
            BaseModel.model_to_device, basicsr.train.create_train_val_dataloader)


def test_patches_are_idempotent_and_keep_basicsr_originals():
    before = installed()
    _compat.apply()
    _compat.apply()
    assert installed() == before
    assert before == (_compat.load_resume_state, options.parse_options, options.parse_options,
                      options.ordered_yaml, _compat.SharedLmdbBackend, _compat.init_dist, _compat.model_to_device,
                      _compat.create_train_val_dataloader)
    assert options.parse_options.basicsr_original is basicsr_options.parse_options
    assert options.ordered_yaml.basicsr_original.__module__ == 'basicsr.utils.options'
    assert _compat.load_resume_state.basicsr_original.__module__ == 'basicsr.train'
    assert _compat.init_dist.basicsr_original.__module__ == 'basicsr.utils.dist_util'
    assert _compat.model_to_device.basicsr_original.__qualname__ == 'BaseModel.model_to_device'
    assert _compat.create_train_val_dataloader.basicsr_original.__module__ == 'basicsr.train'


def test_patches_skip_other_basicsr_versions(monkeypatch):
    monkeypatch.setattr(basicsr, '__version__', '1.5.0')
    monkeypatch.setattr(basicsr.train, 'load_resume_state', 'untouched')
    with pytest.warns(RuntimeWarning, match='basicsr 1.5.0 is installed; the compatibility fixes target basicsr 1.4.2'):
        _compat.apply()
    assert basicsr.train.load_resume_state == 'untouched'


@pytest.mark.slow
def test_p11_import_creates_no_logger():
    code = ('import logging, json, datprl_arch\n'
            'from basicsr.utils.logger import initialized_logger\n'
            "print(json.dumps([len(logging.getLogger('basicsr').handlers), sorted(initialized_logger)]))")
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [0, []]


def setup_keywords(monkeypatch):
    import setuptools
    captured = {}
    monkeypatch.setattr(setuptools, 'setup', lambda **keywords: captured.update(keywords))
    monkeypatch.setattr(sys, 'argv', ['setup.py', '--name'])
    runpy.run_path(os.path.join(REPO, 'setup.py'), run_name='__main__')
    return captured


def test_install_recipe_pins_basicsr_without_tb_nightly_and_declares_setuptools(monkeypatch):
    keywords = setup_keywords(monkeypatch)
    requires = keywords['install_requires']
    assert 'basicsr==1.4.2' in requires and 'setuptools' in requires
    everything = requires + [r for extra in keywords['extras_require'].values() for r in extra]
    assert not [r for r in everything if 'tb-nightly' in r or 'tb_nightly' in r]
    assert not [r for r in requires if r.startswith('tensorboard')]
    assert keywords['extras_require']['tb'] == ['tensorboard>=2.21']
    steps = [line.strip() for line in open(os.path.join(REPO, 'Makefile'), encoding='utf-8')
             if line.startswith('\t$(PIP) install')]
    assert steps == ['$(PIP) install torch==2.14.1 torchvision==0.29.1', '$(PIP) install setuptools wheel',
                     '$(PIP) install --no-build-isolation --no-deps basicsr==1.4.2',
                     '$(PIP) install -r requirements/runtime.txt -r requirements/test.txt',
                     '$(PIP) install --no-build-isolation --no-deps -e .']


def test_resumed_epoch_continues_where_the_saved_run_stopped():
    import logging

    from datprl_arch import _compat
    from basicsr.data.data_sampler import EnlargedSampler

    class Items:
        def __len__(self):
            return 10

    sampler = EnlargedSampler(Items(), num_replicas=1, rank=0, ratio=2)
    sampler.set_epoch(3)
    uninterrupted = list(sampler)
    original = list(_compat._sampler_iter.basicsr_original(sampler))
    assert original == uninterrupted  # unpatched basicsr would replay the epoch from its first index

    opt = {'resume_position': {'epoch': 3, 'iter': 3 * 5 + 2}, 'datasets': {'train': {'batch_size_per_gpu': 4}}}
    _compat._continue_epoch(opt, sampler, per_epoch=5, logger=logging.getLogger('test'))
    assert sampler.resume_skip == (3, 2 * 4)
    assert list(sampler) == uninterrupted[8:]
    sampler.set_epoch(4)
    assert len(list(sampler)) == 20  # later epochs are whole

    mismatched = {'resume_position': {'epoch': 0, 'iter': 9}, 'datasets': {'train': {'batch_size_per_gpu': 4}}}
    fresh = EnlargedSampler(Items(), num_replicas=1, rank=0, ratio=2)
    _compat._continue_epoch(mismatched, fresh, per_epoch=5, logger=logging.getLogger('test'))
    assert not hasattr(fresh, 'resume_skip')


def test_p12_num_gpu_0_trains_on_the_cpu_with_gloo_on_a_gpu_machine(clean_dist_env, tmp_path):
    from torch import distributed as dist
    opt_file = tmp_path / 'x.yml'
    opt_file.write_text('name: x\nnum_gpu: 0\ndist_params:\n  backend: nccl\n')
    clean_dist_env.setattr(sys, 'argv', ['train.py', '-opt', str(opt_file), '--launcher', 'pytorch'])
    clean_dist_env.setattr(torch.cuda, 'is_available', lambda: True)
    clean_dist_env.setattr(torch.cuda, 'set_device', lambda i: pytest.fail('a CPU run must not bind a GPU'))
    calls = []
    clean_dist_env.setattr(dist, 'init_process_group', lambda **kw: calls.append(kw))
    clean_dist_env.setattr(torch.multiprocessing, 'set_start_method', lambda method: None)  # keep pytest's
    clean_dist_env.setenv('RANK', '0')
    clean_dist_env.setenv('WORLD_SIZE', '1')
    clean_dist_env.setenv('LOCAL_RANK', '0')
    clean_dist_env.setenv('MASTER_ADDR', '127.0.0.1')
    clean_dist_env.setenv('MASTER_PORT', '29555')
    _compat.init_dist('pytorch')
    assert calls == [{'backend': 'gloo', 'timeout': datetime.timedelta(seconds=_compat.DEFAULT_DIST_TIMEOUT_S)}]


@pytest.fixture
def captured_init(clean_dist_env):
    """``init_process_group`` records its keywords instead of starting a group; pytest's start method is kept."""
    from torch import distributed as dist
    calls = []
    clean_dist_env.setattr(dist, 'init_process_group', lambda **kw: calls.append(kw))
    clean_dist_env.setattr(torch.multiprocessing, 'set_start_method', lambda method: None)
    return calls


def test_p12_process_group_timeout_comes_from_dist_params_for_torchrun_and_slurm(clean_dist_env, captured_init,
                                                                                 tmp_path):
    from torch.distributed.constants import default_pg_nccl_timeout
    assert datetime.timedelta(seconds=_compat.DEFAULT_DIST_TIMEOUT_S) > default_pg_nccl_timeout  # 10 min
    clean_dist_env.setattr(torch.cuda, 'is_available', lambda: False)
    for name, value in dict(RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1', MASTER_PORT='29555').items():
        clean_dist_env.setenv(name, value)
    opt_file = tmp_path / 'x.yml'
    clean_dist_env.setattr(sys, 'argv', ['train.py', '-opt', str(opt_file), '--launcher', 'pytorch'])
    opt_file.write_text('name: x\ndist_params: {backend: gloo, timeout: 5400}\n')
    _compat.init_dist('pytorch')  # basicsr passes torchrun runs no dist_params: read from the -opt file
    opt_file.write_text('name: x\n')
    _compat.init_dist('pytorch')
    for name, value in dict(SLURM_PROCID='0', SLURM_NTASKS='1', SLURM_NODELIST='n1').items():
        clean_dist_env.setenv(name, value)
    _compat.init_dist('slurm', backend='gloo', port=29556, timeout=7200)  # basicsr: init_dist(**dist_params)
    assert [call['timeout'] for call in captured_init] == [
        datetime.timedelta(seconds=5400), datetime.timedelta(seconds=_compat.DEFAULT_DIST_TIMEOUT_S),
        datetime.timedelta(seconds=7200)]
    for bad in ('2h', 0, True):
        with pytest.raises(options.OptionFileError, match=re.escape(
                f'dist_params.timeout: {bad!r} is not valid; give the process-group timeout in seconds, a number > 0')):
            _compat.init_dist('slurm', backend='gloo', timeout=bad)


def test_p12_slurm_task_bound_to_one_gpu_takes_it_whatever_its_local_id(clean_dist_env, captured_init):
    chosen = []
    clean_dist_env.setattr(torch.cuda, 'is_available', lambda: True)
    clean_dist_env.setattr(torch.cuda, 'device_count', lambda: 1)
    clean_dist_env.setattr(torch.cuda, 'set_device', chosen.append)
    for name, value in dict(SLURM_PROCID='3', SLURM_LOCALID='3', SLURM_NTASKS='4', SLURM_NODELIST='n1',
                            MASTER_ADDR='127.0.0.1').items():  # srun --gpus-per-task=1: task 3 sees one GPU
        clean_dist_env.setenv(name, value)
    _compat.init_dist('slurm', backend='gloo')
    assert chosen == [0] and len(captured_init) == 1
    with pytest.raises(RuntimeError, match=re.escape('local rank 3 has no GPU: 1 CUDA device(s) are visible')):
        _compat._set_cuda_device()  # torchrun with more processes than GPUs stays an error
