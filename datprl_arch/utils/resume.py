"""Choosing the training state a run resumes from, safely.

BasicSR's ``--auto_resume`` takes the highest-numbered ``training_states/<iter>.state`` and its
``models/net_*_<iter>.pth`` files on trust. Here a candidate is used only when its state loads (``weights_only=True``),
every network file it needs is a complete archive, and the network of ``network_g`` with that file's weights gives a
finite output on the probe input (:mod:`.network_probe`: a checkpoint saved after the weights blew up restores
nothing); a damaged or poisoned one is named in a warning and the next older candidate is tried. Leftover
``*.tmp-<pid>`` files of interrupted saves are removed first (never read).

Messages for the log are kept per run (per option dict) until the runner's logger exists (it is created after the
resume state is loaded) and written by :func:`log_pending`.
"""
from __future__ import annotations

import os
import os.path as osp
import zipfile

import torch

from ..errors import MissingFileError
from .checkpoint import CheckpointError, load_error_summary
from .debris import remove_stale_tmp_files
from .network_probe import build_quietly, checkpoint_output_problem, probe_channels

#: Warnings and notes of the resume step per run (``id`` of its option dict), logged once its logger exists.
_PENDING: dict[int, list[tuple[str, str]]] = {}
STATE_SUFFIX = '.state'


def _note(opt: dict, level: str, message: str) -> None:
    _PENDING.setdefault(id(opt), []).append((level, message))


def pending(opt: dict) -> list[tuple[str, str]]:
    """The ``(level, message)`` notes of the resume step of the run ``opt`` not logged yet."""
    return list(_PENDING.get(id(opt), ()))


def log_pending(opt: dict, logger) -> None:
    """Write (and forget) the notes of the resume step of the run ``opt`` to ``logger``."""
    for level, message in _PENDING.pop(id(opt), ()):
        getattr(logger, level)(message)


def training_states(states_dir: str) -> list[tuple[int, str]]:
    """``(iter, path)`` of every ``<iter>.state`` in ``states_dir``, newest first."""
    if not osp.isdir(states_dir):
        return []
    found = [(int(name[:-len(STATE_SUFFIX)]), osp.join(states_dir, name)) for name in os.listdir(states_dir)
             if name.endswith(STATE_SUFFIX) and name[:-len(STATE_SUFFIX)].isdigit()]
    return sorted(found, reverse=True)


def read_state(path: str) -> dict:
    """The training state in ``path`` (CPU, ``weights_only=True``); :class:`CheckpointError` names the file."""
    if not osp.isfile(path):
        raise MissingFileError(f'path.resume_state: training state {path!r} does not exist (expected '
                               '<root>/experiments/<name>/training_states/<iter>.state)')
    if osp.getsize(path) == 0:
        raise CheckpointError(f'training state {path} is empty (0 bytes)')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # torch raises many types for damaged or unsafe files
        raise CheckpointError(f'cannot read training state {path} with weights_only=True ({load_error_summary(err)})') \
            from None
    if not isinstance(state, dict) or not {'iter', 'epoch'} <= set(state):
        raise CheckpointError(f'{path} is not a BasicSR training state (no iter/epoch entries)')
    return state


def network_files(opt: dict, current_iter: int) -> list[str]:
    """The ``models/net_<x>_<iter>.pth`` files BasicSR's ``check_resume`` will load for a state at ``current_iter``."""
    ignored = opt['path'].get('ignore_resume_networks') or ()
    return [osp.join(opt['path']['models'], f"net_{key[len('network_'):]}_{current_iter}.pth")
            for key in opt if key.startswith('network_') and key not in ignored]


def checkpoint_problem(path: str) -> str | None:
    """Why the network file ``path`` cannot be loaded (missing, empty, truncated archive), or None."""
    if not osp.isfile(path):
        return f'{path} does not exist'
    if osp.getsize(path) == 0:
        return f'{path} is empty'
    if not zipfile.is_zipfile(path):
        return f'{path} is not a complete checkpoint (truncated?)'
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile) as err:
        return f'{path} is damaged ({err})'
    return f'{path} is damaged (entry {bad} fails its checksum)' if bad else None


class GeneratorProbe:
    """The probe of :mod:`.network_probe` on the ``net_g`` files of the resume candidates: the network of
    ``network_g`` is built once, on the CPU, at the first file asked about (None when it cannot be built here: the
    model build then reports the options)."""

    def __init__(self, opt: dict):
        self.opt, self.net, self.built = opt, None, False
        self.skipped = 'network_g' in (opt['path'].get('ignore_resume_networks') or ())

    def problem(self, current_iter: int) -> str | None:
        """Why ``models/net_g_<iter>.pth`` holds weights that restore nothing (non-finite probe output), or None."""
        network_opt = self.opt.get('network_g')
        if self.skipped or not isinstance(network_opt, dict):
            return None
        if not self.built:
            self.built = True
            try:
                self.net = build_quietly(network_opt)
            except Exception:  # a bad network_g is the model build's to report, with its message
                self.net = None
        if self.net is None:
            return None
        path = osp.join(self.opt['path']['models'], f'net_g_{current_iter}.pth')
        return checkpoint_output_problem(self.net, path, probe_channels(network_opt))


def choose_resume_state(opt: dict) -> tuple[str, dict] | None:
    """``(path, state)`` to resume from, or None to start afresh (see the module docstring).

    ``--auto_resume``: the newest usable state of ``path.training_states`` (older ones when newer are damaged,
    each named in a warning; :class:`CheckpointError` when states exist but none is usable). An explicit
    ``path.resume_state`` (relative to the run's root) is used or refused, never replaced."""
    root = opt['path'].get('experiments_root')
    if root and osp.isdir(root) and opt.get('rank', 0) == 0:  # only rank 0 writes there
        removed = remove_stale_tmp_files(root)
        if removed:
            _note(opt, 'info', f'Removed {len(removed)} leftover file(s) of interrupted writes: {removed}')
    if not opt['auto_resume']:
        if not opt['path'].get('resume_state'):
            return None
        path = osp.join(opt.get('root_path') or os.getcwd(), opt['path']['resume_state'])
        return path, read_state(path)
    candidates = training_states(opt['path']['training_states'])
    skipped, probe = [], GeneratorProbe(opt)
    for current_iter, path in candidates:
        try:
            state = read_state(path)
            problems = [p for p in map(checkpoint_problem, network_files(opt, state['iter'])) if p]
            if problems:
                raise CheckpointError(f'{path}: its network file {"; ".join(problems)}')
            poisoned = probe.problem(state['iter'])
            if poisoned:
                raise CheckpointError(f'{path}: its network file {poisoned} (saved after the weights blew up)')
        except CheckpointError as err:
            skipped.append(str(err))
            _note(opt, 'warning', f'--auto_resume: skipping {err}.')
            continue
        if skipped:
            _note(opt, 'warning', f'--auto_resume: resuming from the older state {path} (iter {state["iter"]}) '
                  f'because {len(skipped)} newer one(s) cannot be used (see above).')
        return path, state
    if candidates:
        listed = '\n  - '.join(skipped)
        raise CheckpointError(f"--auto_resume: none of the {len(candidates)} training state(s) in "
                              f"{opt['path']['training_states']} can be used:\n  - {listed}\nMove them away to start "
                              'afresh, or point path.resume_state at a good one.')
    return None


def limit_to_saved_iter(opt: dict, state: dict) -> None:
    """A state beyond ``train.total_iter`` has nothing left to train: keep BasicSR from labelling the final
    validation and checkpoint with the lower ``total_iter`` (they are the saved iteration's) and say so."""
    total, saved = (opt.get('train') or {}).get('total_iter'), int(state['iter'])
    if total is not None and saved > int(total):
        opt['train']['total_iter'] = saved
        _note(opt, 'warning', f'The resumed state is at iter {saved}, beyond train.total_iter {total}: there is '
              f'nothing left to train. The final checkpoint and validation are those of iter {saved} (labelled so); '
              'raise total_iter to train further.')
