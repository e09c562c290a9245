"""basicsr 1.4.2 on the current stack (torchvision 0.29, SciPy 1.17, py-lmdb 3, CPU-only machines).

Imported by ``datprl_arch/__init__`` before anything imports basicsr. One function per fix, all applied on import,
each idempotent. Fixes that change basicsr apply only to the pinned basicsr 1.4.2; a replaced function or class keeps
the one it replaced as ``.basicsr_original``. Problem numbers refer to docs/compat.md.

- P1  torchvision >= 0.17 removed ``transforms.functional_tensor``, which ``import basicsr`` needs: alias it.
- P21 ``scipy.ndimage.filters`` (NIQE) is deprecated; alias it to ``scipy.ndimage`` once it is gone.
- P2/P3 resume loads states onto CUDA and auto-resume looks under the current directory: resume on CPU, from the
  run's own ``training_states`` (absolute), with ``weights_only=True``.
- P4  py-lmdb >= 2 refuses a second open of one LMDB in a process (shared GT LMDBs, val = train): FileClient's
  ``lmdb`` backend shares one environment per (process, LMDB).
- P19 and option safety: ``parse_options`` of ``basicsr.train`` / ``basicsr.test`` reads option files with a safe
  loader and checks ``num_gpu``, ``use_tb_logger`` and the output folder against the machine
  (``datprl_arch.options``); ``mkdir_and_rename`` names a folder it cannot create or move aside
  (``datprl_arch.utils.folders``) instead of a raw ``OSError``.
- P12 distributed training assumes CUDA: ``init_dist`` (as ``parse_options`` calls it) picks nccl or gloo and works
  on CPU for torchrun and slurm, with a process-group timeout long enough for rank-0 validation
  (``dist_params.timeout``); ``BaseModel.model_to_device`` wraps CPU networks in DDP without ``device_ids``.
- P20 the epoch count ignores ``drop_last``, so runs end before ``total_iter``: epochs are counted from the batches
  an epoch really has, and a dataset too small for one batch per rank is an error.
- P26 a resumed run restarts its epoch's data order: the sampler skips the batches used before the save.
"""
from __future__ import annotations

import datetime
import itertools
import math
import os
import subprocess
import sys
import warnings

SUPPORTED_BASICSR = '1.4.2'


def _alias_functional_tensor() -> None:
    """P1: serve ``torchvision.transforms.functional_tensor`` from its private successor."""
    name = 'torchvision.transforms.functional_tensor'
    if sys.modules.get(name) is not None:
        return
    try:
        import torchvision.transforms._functional_tensor as functional_tensor
    except ImportError:  # torchvision < 0.15 still ships the public module under its own name
        return
    sys.modules[name] = functional_tensor


def _alias_scipy_ndimage_filters() -> None:
    """P21: ``from scipy.ndimage.filters import ...`` keeps working after SciPy removes the deprecated module."""
    try:
        import scipy.ndimage.filters  # noqa: F401
    except ImportError:
        import scipy.ndimage
        sys.modules['scipy.ndimage.filters'] = scipy.ndimage


def _install(namespace, name: str, new) -> None:
    """``namespace[name] = new`` (a module's ``vars()`` or a dict), or ``setattr`` on a class; idempotent.

    The basicsr object replaced first is kept as ``new.basicsr_original``."""
    current = vars(namespace)[name] if isinstance(namespace, type) else namespace[name]
    new.basicsr_original = getattr(current, 'basicsr_original', current)
    if isinstance(namespace, type):
        setattr(namespace, name, new)
    else:
        namespace[name] = new


def _basicsr_is_supported() -> bool:
    import basicsr
    if basicsr.__version__ == SUPPORTED_BASICSR:
        return True
    warnings.warn(f'datprl_arch: basicsr {basicsr.__version__} is installed; the compatibility fixes target '
                  f'basicsr {SUPPORTED_BASICSR} and were not applied.', RuntimeWarning, stacklevel=2)
    return False


# P2/P3: resume -----------------------------------------------------------------------------------------------------

def load_resume_state(opt: dict):
    """Replacement for ``basicsr.train.load_resume_state``: same contract, CPU-safe, independent of the cwd, and
    never trusting a damaged file (``datprl_arch.utils.resume``).

    ``--auto_resume`` takes the newest usable state in ``opt['path']['training_states']`` (absolute, under the run's
    root), falling back past damaged ones with a warning; an explicit ``path.resume_state`` that is relative is
    taken from the root the experiments are written to. States load onto the CPU with ``weights_only=True``;
    ``resume_training`` moves them to the parameters' device. A state beyond ``train.total_iter`` raises
    ``total_iter`` to it (nothing left to train, results labelled with the saved iteration).
    """
    from basicsr.utils import check_resume

    from .utils.resume import choose_resume_state, limit_to_saved_iter

    chosen = choose_resume_state(opt)
    if chosen is None:
        return None
    path, state = chosen
    opt['path']['resume_state'] = path
    check_resume(opt, state['iter'])
    limit_to_saved_iter(opt, state)
    opt['resume_position'] = {'epoch': state['epoch'], 'iter': state['iter']}  # for the sampler (P26)
    return state


def _patch_resume() -> None:
    import basicsr.train
    _install(vars(basicsr.train), 'load_resume_state', load_resume_state)


# P4: one LMDB environment per process ------------------------------------------------------------------------------

_LMDB_ENVS: dict = {}  # realpath -> (pid, identity of data.mdb, lmdb.Environment)


def _lmdb_identity(path: str) -> tuple:
    data_file = os.path.join(path, 'data.mdb') if os.path.isdir(path) else path
    try:
        stat = os.stat(data_file)
    except FileNotFoundError:
        raise FileNotFoundError(f"LMDB {path!r} does not exist or has no data.mdb (io_backend type 'lmdb').") from None
    return stat.st_dev, stat.st_ino


def shared_lmdb_env(path: str, **open_kwargs):
    """This process's read-only environment for the LMDB at ``path``, opened on first use and then shared.

    An environment inherited through ``fork`` (DataLoader workers) is closed and reopened in the child; one whose
    files were replaced since it was opened is reopened. ``open_kwargs`` go to ``lmdb.open`` on (re)opening; a
    ``data.mdb`` shorter than its pages is an ``LmdbError`` (reading it would end the process with SIGBUS).
    """
    from .data.lmdb.checks import open_checked

    key = os.path.realpath(path)
    identity, pid = _lmdb_identity(key), os.getpid()
    cached = _LMDB_ENVS.get(key)
    if cached is not None:
        if cached[:2] == (pid, identity):
            return cached[2]
        cached[2].close()
    options = dict(readonly=True, lock=False, readahead=False, subdir=os.path.isdir(key))
    options.update(open_kwargs)
    env = open_checked(key, **options)  # a truncated data.mdb is an error here, not a SIGBUS on the first read
    _LMDB_ENVS[key] = (pid, identity, env)
    return env


class SharedLmdbBackend:
    """FileClient ``lmdb`` backend (same arguments as BasicSR's ``LmdbBackend``) reading through ``shared_lmdb_env``."""

    def __init__(self, db_paths, client_keys='default', readonly=True, lock=False, readahead=False, **kwargs):
        paths = [db_paths] if isinstance(db_paths, (str, os.PathLike)) else list(db_paths)
        keys = [client_keys] if isinstance(client_keys, str) else list(client_keys)
        if len(paths) != len(keys):
            raise ValueError(f'lmdb backend: {len(keys)} client_keys {keys} for {len(paths)} db_paths {paths}.')
        self._open_kwargs = dict(readonly=readonly, lock=lock, readahead=readahead, **kwargs)
        self._paths = {key: str(path) for key, path in zip(keys, paths)}
        for path in self._paths.values():
            shared_lmdb_env(path, **self._open_kwargs)

    def get(self, filepath, client_key: str):
        """Bytes stored under key ``filepath`` in the LMDB named ``client_key`` (None if the key is absent)."""
        if client_key not in self._paths:
            raise KeyError(f'lmdb backend: client_key {client_key!r} is not one of {list(self._paths)}.')
        import lmdb

        from .data.lmdb.checks import check_size, damaged

        path = self._paths[client_key]
        env = shared_lmdb_env(path, **self._open_kwargs)
        check_size(path, env)  # a stat per read: a file cut short after opening is an error, not a SIGBUS
        try:
            with env.begin(write=False) as txn:
                return txn.get(str(filepath).encode('ascii'))
        except lmdb.Error as err:
            raise damaged(path, err, str(filepath)) from None

    def get_text(self, filepath):
        raise NotImplementedError('The lmdb backend stores images, not text.')


def _patch_lmdb_backend() -> None:
    from basicsr.utils.file_client import FileClient
    _install(FileClient._backends, 'lmdb', SharedLmdbBackend)


# P19 and option-file safety ----------------------------------------------------------------------------------------

def _patch_option_parsing() -> None:
    import basicsr.test
    import basicsr.train
    from basicsr.utils import misc
    from basicsr.utils import options as basicsr_options

    from . import options
    from .utils import folders
    _install(vars(basicsr_options), 'ordered_yaml', options.ordered_yaml)
    _install(vars(basicsr.train), 'parse_options', options.parse_options)
    _install(vars(basicsr.test), 'parse_options', options.parse_options)
    for namespace in (vars(misc), vars(basicsr.train)):  # make_exp_dirs' and the tb_logger folder's
        _install(namespace, 'mkdir_and_rename', folders.mkdir_and_rename)


# P12: distributed training on CUDA (nccl) and on the CPU (gloo) --------------------------------------------------

#: What torchrun (``--launcher pytorch``) exports for the ``env://`` rendezvous.
TORCHRUN_ENV = ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')
#: What srun exports to every task (``--launcher slurm``).
SLURM_ENV = ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST')
#: torch.distributed's default rendezvous port, as in basicsr.
DEFAULT_MASTER_PORT = 29500
#: Process-group timeout (seconds) without ``dist_params.timeout``. Rank 0 validates and saves alone while the other
#: ranks wait in their next collective; nccl's own default (10 minutes) would abort a job whose validation round takes
#: longer (natural-5T validates, among others, 1,111 HD GoPro frames). A real hang is reported after this long.
DEFAULT_DIST_TIMEOUT_S = 2 * 3600


def dist_backend(requested: str | None = None) -> str:
    """The process-group backend: ``requested`` (``dist_params.backend``) when this machine can run it, otherwise
    ``nccl`` where CUDA (with NCCL) is available and ``gloo`` where it is not. A known backend that cannot run here
    (``nccl`` on a CPU machine, ``mpi`` without an MPI build) is replaced, with a ``RuntimeWarning``; other names
    (``cpu:gloo,cuda:nccl``, registered third-party backends) go to ``torch.distributed`` unchanged."""
    import torch
    from torch import distributed as dist

    cuda = torch.cuda.is_available() and dist.is_nccl_available()
    fallback = 'nccl' if cuda else 'gloo'
    if requested is None:
        return fallback
    name = str(requested).lower()
    usable = {'nccl': lambda: cuda, 'gloo': dist.is_gloo_available, 'mpi': dist.is_mpi_available,
              'ucc': dist.is_ucc_available}
    if name in usable and not usable[name]():
        why = 'no CUDA device' if name == 'nccl' and not torch.cuda.is_available() else 'not built into this torch'
        warnings.warn(f'dist_params.backend: {requested!r} cannot run on this machine ({why}); using {fallback!r}.',
                      RuntimeWarning, stacklevel=2)
        return fallback
    return name


def _require_env(names: tuple, launcher: str, how: str) -> None:
    missing = [name for name in names if name not in os.environ]
    if missing:
        raise RuntimeError(f'--launcher {launcher}: environment variable(s) {", ".join(missing)} not set; {how}')


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list (``node[01-04]`` -> ``node01``), expanded by ``scontrol`` as basicsr does."""
    try:
        done = subprocess.run(['scontrol', 'show', 'hostnames', nodelist], capture_output=True, text=True,
                              check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise RuntimeError(f'--launcher slurm: cannot expand SLURM_NODELIST={nodelist!r} with scontrol ({err}); '
                           'set MASTER_ADDR to the address of the first node.') from None
    hosts = done.stdout.split()
    if not hosts:
        raise RuntimeError(f'--launcher slurm: scontrol listed no host for SLURM_NODELIST={nodelist!r}; set '
                           'MASTER_ADDR to the address of the first node.')
    return hosts[0]


def _export_slurm_env(port: int | None) -> None:
    """torch's ``env://`` variables from srun's: rank, world size, local rank, master address and port.

    ``MASTER_ADDR`` is kept when set, else it is the first node of the allocation. The port is ``dist_params.port``,
    else ``MASTER_PORT``, else 29500 (basicsr's order)."""
    import torch

    _require_env(SLURM_ENV, 'slurm', 'start one task per GPU (or per CPU process) with srun, e.g. '
                 '`srun --ntasks-per-node=4 python -m datprl_arch.train -opt FILE.yml --launcher slurm`.')
    proc_id = int(os.environ['SLURM_PROCID'])
    if 'MASTER_ADDR' not in os.environ:
        os.environ['MASTER_ADDR'] = _first_slurm_host(os.environ['SLURM_NODELIST'])
    os.environ['MASTER_PORT'] = str(port if port is not None else os.environ.get('MASTER_PORT', DEFAULT_MASTER_PORT))
    os.environ['WORLD_SIZE'] = os.environ['SLURM_NTASKS']
    os.environ['RANK'] = str(proc_id)
    os.environ['LOCAL_RANK'] = os.environ.get('SLURM_LOCALID', str(proc_id % max(torch.cuda.device_count(), 1)))


def dist_timeout(seconds=None) -> datetime.timedelta:
    """``dist_params.timeout`` (seconds, a number > 0; default ``DEFAULT_DIST_TIMEOUT_S``) as the timedelta
    ``init_process_group`` wants; a bad value raises ``OptionFileError``."""
    from .options import OptionFileError

    if seconds is None:
        seconds = DEFAULT_DIST_TIMEOUT_S
    if isinstance(seconds, datetime.timedelta):
        return seconds
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < math.inf:
        raise OptionFileError(f'dist_params.timeout: {seconds!r} is not valid; give the process-group timeout in '
                              f'seconds, a number > 0 (default {DEFAULT_DIST_TIMEOUT_S}), e.g. '
                              '`dist_params: {timeout: 7200}`.')
    return datetime.timedelta(seconds=seconds)


def _set_cuda_device(slurm: bool = False) -> None:
    """Bind this process to GPU ``LOCAL_RANK`` (torchrun and srun export it; else ``RANK`` modulo the GPUs).

    A Slurm task that sees a single GPU (``--gpus-per-task=1``, per-task binding) takes it whatever its
    ``SLURM_LOCALID``: basicsr's ``proc_id % num_gpus``."""
    import torch

    count = torch.cuda.device_count()
    local_rank = int(os.environ.get('LOCAL_RANK', int(os.environ['RANK']) % count))
    if local_rank >= count and slurm and count == 1:
        local_rank = int(os.environ['RANK']) % count
    if local_rank >= count:
        raise RuntimeError(f'local rank {local_rank} has no GPU: {count} CUDA device(s) are visible '
                           f'(CUDA_VISIBLE_DEVICES={os.environ.get("CUDA_VISIBLE_DEVICES")!r}); start at most {count} '
                           'processes per node (torchrun --nproc_per_node, srun --ntasks-per-node).')
    torch.cuda.set_device(local_rank)


def init_dist(launcher: str, backend: str | None = None, port: int | None = None, **kwargs) -> None:
    """Replacement for ``basicsr.utils.dist_util.init_dist`` as ``parse_options`` calls it (``--launcher``).

    basicsr 1.4.2 hard-wires nccl and divides by the CUDA device count (``ZeroDivisionError`` on a CPU machine).
    Here the backend comes from ``dist_backend`` (nccl with CUDA, gloo without, or a usable
    ``dist_params.backend``: basicsr passes ``dist_params`` only with slurm, so for torchrun it is read from the
    ``-opt`` file); with CUDA the process is bound to GPU ``LOCAL_RANK``, unless the option file says
    ``num_gpu: 0`` (CPU training on a GPU machine: gloo, no GPU binding).

    - ``pytorch``: torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``);
      ``dist_params.port`` does not apply (use ``torchrun --master_port``).
    - ``slurm``: srun's (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_NODELIST``, ``SLURM_LOCALID``), see
      ``_export_slurm_env``.

    ``kwargs`` go to ``torch.distributed.init_process_group``; ``timeout`` (``dist_params.timeout``, seconds, also
    read from the ``-opt`` file for torchrun) defaults to ``DEFAULT_DIST_TIMEOUT_S``, see ``dist_timeout``. Like
    basicsr, the multiprocessing start method becomes ``spawn`` unless one was chosen.

    ``--force_yml`` entries for ``num_gpu`` and ``dist_params`` (``backend``, ``port``, ``timeout``) apply here
    already: basicsr applies the command line's overrides only after this call.
    """
    import torch
    import torch.multiprocessing as mp
    from torch import distributed as dist

    from .options import command_line_dist_params, command_line_num_gpu, command_line_overrides
    if launcher == 'pytorch':
        file_params = command_line_dist_params()
        backend = file_params.get('backend') if backend is None else backend
        kwargs.setdefault('timeout', file_params.get('timeout'))
        if 'init_method' not in kwargs:
            _require_env(TORCHRUN_ENV, 'pytorch', 'start the processes with torchrun, e.g. '
                         '`torchrun --nproc_per_node=2 -m datprl_arch.train -opt FILE.yml --launcher pytorch`.')
    elif launcher == 'slurm':
        forced = {keys[1]: value for keys, value in command_line_overrides().items()
                  if len(keys) == 2 and keys[0] == 'dist_params'}  # basicsr passed the file's dist_params
        backend, port = forced.pop('backend', backend), forced.pop('port', port)
        kwargs.update(forced)
        _export_slurm_env(port)
    else:
        raise ValueError(f"--launcher {launcher!r}: expected 'pytorch' (torchrun) or 'slurm' (srun).")
    cpu_only = command_line_num_gpu() == 0  # num_gpu: 0 keeps the networks on the CPU, even on a GPU machine
    if cpu_only and backend in (None, 'nccl'):
        backend = 'gloo'
    backend = dist_backend(backend)
    kwargs['timeout'] = dist_timeout(kwargs.get('timeout'))
    if torch.cuda.is_available() and not cpu_only:
        _set_cuda_device(slurm=launcher == 'slurm')
    if mp.get_start_method(allow_none=True) is None:
        mp.set_start_method('spawn')
    dist.init_process_group(backend=backend, **kwargs)


def model_to_device(self, net):
    """Replacement for ``BaseModel.model_to_device``: the network on ``self.device``, wrapped in
    ``DistributedDataParallel`` when training is distributed, in ``DataParallel`` for ``num_gpu > 1`` without.

    basicsr 1.4.2 gives DDP ``device_ids=[torch.cuda.current_device()]``, which fails without CUDA; a CPU network
    gets ``device_ids=None``. ``find_unused_parameters`` is the option file's top-level key (default false): set it
    when some parameters get no gradient in a step."""
    import torch
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    net = net.to(self.device)
    if self.opt['dist']:
        device_ids = [torch.cuda.current_device()] if self.device.type == 'cuda' else None
        return DistributedDataParallel(net, device_ids=device_ids,
                                       find_unused_parameters=bool(self.opt.get('find_unused_parameters', False)))
    if self.opt['num_gpu'] > 1:
        return DataParallel(net)
    return net


def _patch_distributed() -> None:
    from basicsr.models.base_model import BaseModel
    from basicsr.utils import options as basicsr_options
    _install(vars(basicsr_options), 'init_dist', init_dist)
    _install(BaseModel, 'model_to_device', model_to_device)


# P20: epochs counted from real batches ---------------------------------------------------------------------------

def create_train_val_dataloader(opt: dict, logger):
    """Replacement for ``basicsr.train.create_train_val_dataloader`` (same returns): basicsr counts an epoch as
    ``ceil(len * enlarge_ratio / (batch * world_size))`` batches, but its loader drops the last partial batch of each
    rank's shard, so small datasets and many ranks stop training before ``total_iter``. The epoch count is raised to
    what the loader really yields; a rank shard smaller than one batch is an error naming the options to change."""
    from .data.multidomain_dataset import label_warnings
    from .utils.resume import log_pending

    log_pending(opt, logger)
    original = create_train_val_dataloader.basicsr_original
    train_loader, train_sampler, val_loaders, total_epochs, total_iters = original(opt, logger)
    for warning in label_warnings(train_loader.dataset, [loader.dataset for loader in val_loaders]):
        logger.warning(warning)
    per_epoch = len(train_loader)
    train_opt = opt['datasets']['train']
    if per_epoch == 0:
        from .data.sources import DataSourceError
        raise DataSourceError(
            f"datasets.train: each of the {opt['world_size']} rank(s) gets {len(train_sampler)} sample(s) per epoch, "
            f"fewer than batch_size_per_gpu: {train_opt['batch_size_per_gpu']}, so no batch would ever be drawn. "
            'Raise dataset_enlarge_ratio (or the sources\' augment_factor) or lower batch_size_per_gpu.')
    needed = math.ceil(total_iters / per_epoch)
    if needed > total_epochs:
        logger.info(f'An epoch has {per_epoch} full batch(es) per rank (the last partial one is dropped): '
                    f'total epochs raised from {total_epochs} to {needed} so training reaches iter {total_iters}.')
        total_epochs = needed
    _continue_epoch(opt, train_sampler, per_epoch, logger)
    return train_loader, train_sampler, val_loaders, total_epochs, total_iters


# P26: a resumed run continues its epoch's data order -------------------------------------------------------------

def _continue_epoch(opt: dict, sampler, per_epoch: int, logger) -> None:
    """basicsr restarts a resumed epoch from its first batch, so the batches seen before the save are drawn again
    and the rest of the epoch never is. Epoch ``e`` covers iterations ``e * per_epoch + 1 ..`` (every epoch yields
    ``per_epoch`` batches), so the sampler skips the batches the saved iteration already consumed."""
    position = opt.get('resume_position')
    if not position:
        return
    consumed = position['iter'] - position['epoch'] * per_epoch
    if 0 < consumed <= per_epoch:
        sampler.resume_skip = (position['epoch'], consumed * opt['datasets']['train']['batch_size_per_gpu'])
        logger.info(f"Resuming inside epoch {position['epoch']}: its first {consumed} batch(es) were used before "
                    'the save and are skipped.')
    else:
        logger.info(f"Resume state (epoch {position['epoch']}, iter {position['iter']}) does not match "
                    f'{per_epoch} batches per epoch (batch size or data changed?): epoch {position["epoch"]} '
                    'starts from its first batch.')


def _sampler_iter(self):
    """``EnlargedSampler.__iter__`` that drops the first indices of a resumed epoch (``resume_skip``)."""
    indices = _sampler_iter.basicsr_original(self)
    epoch, skip = getattr(self, 'resume_skip', (None, 0))
    return itertools.islice(indices, skip, None) if self.epoch == epoch else indices


def _patch_sampler_resume() -> None:
    from basicsr.data.data_sampler import EnlargedSampler
    _install(EnlargedSampler, '__iter__', _sampler_iter)


def _patch_epoch_count() -> None:
    import basicsr.train
    _install(vars(basicsr.train), 'create_train_val_dataloader', create_train_val_dataloader)


def apply() -> None:
    """Apply every fix (idempotent)."""
    _alias_functional_tensor()
    _alias_scipy_ndimage_filters()
    if not _basicsr_is_supported():
        return
    _patch_resume()
    _patch_lmdb_backend()
    _patch_option_parsing()
    _patch_distributed()
    _patch_epoch_count()
    _patch_sampler_resume()


apply()
