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
  loader and checks ``num_gpu`` and ``use_tb_logger`` against the machine (``datprl_arch.options``).
"""
from __future__ import annotations

import os
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


def _install(namespace: dict, name: str, new) -> None:
    """``namespace[name] = new`` (a module's ``vars()`` or a dict); idempotent.

    The basicsr object replaced first is kept as ``new.basicsr_original``."""
    current = namespace[name]
    new.basicsr_original = getattr(current, 'basicsr_original', current)
    namespace[name] = new


def _basicsr_is_supported() -> bool:
    import basicsr
    if basicsr.__version__ == SUPPORTED_BASICSR:
        return True
    warnings.warn(f'datprl_arch: basicsr {basicsr.__version__} is installed; the compatibility fixes target '
                  f'basicsr {SUPPORTED_BASICSR} and were not applied.', RuntimeWarning, stacklevel=2)
    return False


# P2/P3: resume -----------------------------------------------------------------------------------------------------

def latest_training_state(states_dir: str) -> str | None:
    """Path of the ``<iter>.state`` file with the highest iteration in ``states_dir``, or None."""
    if not os.path.isdir(states_dir):
        return None
    iters = [int(name[:-len('.state')]) for name in os.listdir(states_dir)
             if name.endswith('.state') and name[:-len('.state')].isdigit()]
    return os.path.join(states_dir, f'{max(iters)}.state') if iters else None


def load_resume_state(opt: dict):
    """Replacement for ``basicsr.train.load_resume_state``: same contract, CPU-safe and independent of the cwd.

    ``--auto_resume`` takes the newest state in ``opt['path']['training_states']`` (absolute, under the run's root);
    an explicit ``path.resume_state`` that is relative is taken from the root the experiments are written to.
    States load onto the CPU with ``weights_only=True``; ``resume_training`` moves them to the parameters' device.
    """
    import torch
    from basicsr.utils import check_resume

    if opt['auto_resume']:
        path = latest_training_state(opt['path']['training_states'])
    elif opt['path'].get('resume_state'):
        path = os.path.join(opt.get('root_path') or os.getcwd(), opt['path']['resume_state'])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path.resume_state: training state {path!r} does not exist (expected "
                                    "<root>/experiments/<name>/training_states/<iter>.state).")
    else:
        path = None
    if path is None:
        return None
    opt['path']['resume_state'] = path
    state = torch.load(path, map_location='cpu', weights_only=True)
    check_resume(opt, state['iter'])
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
    files were replaced since it was opened is reopened. ``open_kwargs`` go to ``lmdb.open`` on (re)opening.
    """
    import lmdb

    key = os.path.realpath(path)
    identity, pid = _lmdb_identity(key), os.getpid()
    cached = _LMDB_ENVS.get(key)
    if cached is not None:
        if cached[:2] == (pid, identity):
            return cached[2]
        cached[2].close()
    options = dict(readonly=True, lock=False, readahead=False, subdir=os.path.isdir(key))
    options.update(open_kwargs)
    env = lmdb.open(key, **options)
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
        env = shared_lmdb_env(self._paths[client_key], **self._open_kwargs)
        with env.begin(write=False) as txn:
            return txn.get(str(filepath).encode('ascii'))

    def get_text(self, filepath):
        raise NotImplementedError('The lmdb backend stores images, not text.')


def _patch_lmdb_backend() -> None:
    from basicsr.utils.file_client import FileClient
    _install(FileClient._backends, 'lmdb', SharedLmdbBackend)


# P19 and option-file safety ----------------------------------------------------------------------------------------

def _patch_option_parsing() -> None:
    import basicsr.test
    import basicsr.train
    from basicsr.utils import options as basicsr_options

    from . import options
    _install(vars(basicsr_options), 'ordered_yaml', options.ordered_yaml)
    _install(vars(basicsr.train), 'parse_options', options.parse_options)
    _install(vars(basicsr.test), 'parse_options', options.parse_options)


def apply() -> None:
    """Apply every fix (idempotent)."""
    _alias_functional_tensor()
    _alias_scipy_ndimage_filters()
    if not _basicsr_is_supported():
        return
    _patch_resume()
    _patch_lmdb_backend()
    _patch_option_parsing()


apply()
