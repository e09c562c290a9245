"""Safe, checked option files for BasicSR's ``train_pipeline`` / ``test_pipeline``.

basicsr 1.4.2 reads option files with PyYAML's full loader, so a tag such as ``!!python/object/apply:os.system``
in a shared option file runs a command. ``OptionLoader`` keeps BasicSR's semantics (mappings as ``OrderedDict``,
``!!float 2e-4``, ``~`` for None) but builds nothing else: any other tag is rejected with the file, line and tag.

``parse_options`` wraps BasicSR's own ``parse_options`` (same flags, same result) and adds the checks BasicSR lacks:
the ``-opt`` file exists, ``num_gpu`` fits the machine, and ``use_tb_logger: true`` has TensorBoard to write to.
``datprl_arch._compat`` installs both into basicsr on import, so BasicSR's own runners get them too.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import OrderedDict
from typing import Callable

import torch
import yaml
from basicsr.utils import options as basicsr_options

from .errors import DatprlError

YAML_TAG_PREFIX = 'tag:yaml.org,2002:'
SafeBase = getattr(yaml, 'CSafeLoader', yaml.SafeLoader)


class OptionFileError(DatprlError, ValueError):
    """An option file (or a value in it) that BasicSR's runners cannot use; the message says what to change."""


def _short_tag(tag: str) -> str:
    return '!!' + tag[len(YAML_TAG_PREFIX):] if tag.startswith(YAML_TAG_PREFIX) else tag


class OptionLoader(SafeBase):
    """PyYAML safe loader with BasicSR's option semantics: mappings load as ``OrderedDict``; the document must be a
    mapping; any tag a safe loader does not know (``!!python/...``) raises ``OptionFileError``, never runs."""

    def __init__(self, stream):
        self.option_file = getattr(stream, 'name', '<option file>')
        super().__init__(stream)

    def construct_ordered_mapping(self, node: yaml.MappingNode) -> OrderedDict:
        self.flatten_mapping(node)
        return OrderedDict(self.construct_pairs(node))

    def reject_tag(self, node: yaml.Node):
        mark = node.start_mark
        raise OptionFileError(
            f'{mark.name}, line {mark.line + 1}: YAML tag {_short_tag(node.tag)!r} is not allowed in option files. '
            'They are read with a safe loader that builds only mappings, lists, strings, numbers, booleans and '
            'null (`!!float 2e-4` and `~` are fine); nothing in the file was executed.')

    def get_single_data(self):
        data = super().get_single_data()
        if not isinstance(data, dict):
            found = 'nothing (the file is empty)' if data is None else f'a {type(data).__name__}'
            raise OptionFileError(f'{self.option_file}: an option file must be a YAML mapping '
                                  f'(name: ..., datasets: ...), found {found}.')
        return data


OptionLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, OptionLoader.construct_ordered_mapping)
OptionLoader.add_constructor(None, OptionLoader.reject_tag)


def load_option_file(path: str) -> OrderedDict:
    """Read an option file safely (see ``OptionLoader``); a missing file raises ``OptionFileError``."""
    _check_exists(path)
    with open(path, encoding='utf-8') as stream:
        return yaml.load(stream, Loader=OptionLoader)


def ordered_yaml():
    """Drop-in for ``basicsr.utils.options.ordered_yaml``: the safe ``OptionLoader`` and BasicSR's own dumper."""
    basicsr_ordered_yaml = basicsr_options.ordered_yaml
    return OptionLoader, getattr(basicsr_ordered_yaml, 'basicsr_original', basicsr_ordered_yaml)()[1]


def parse_options(root_path: str, is_train: bool = True):
    """BasicSR's ``parse_options`` (same command line, same ``(opt, args)``) with the option file checked first and
    ``num_gpu`` / ``use_tb_logger`` checked against this machine before anything is written."""
    _check_exists(_option_file_argument())
    opt, args = basicsr_options.parse_options(root_path, is_train)
    check_num_gpu(opt, args.opt)
    if is_train:
        check_tensorboard(opt, args.opt)
    return opt, args


def _option_file_argument() -> str | None:
    """The ``-opt`` value of the command line, or None (BasicSR's parser then reports it missing)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('-opt', type=str)
    return parser.parse_known_args()[0].opt


def _command_line_options() -> tuple[str | None, dict]:
    """The ``-opt`` file on the command line and its options (``(None, {})`` without one)."""
    path = _option_file_argument()
    if path is None or not os.path.isfile(path):
        return None, {}
    return path, load_option_file(path)


def command_line_num_gpu():
    """``num_gpu`` of the ``-opt`` file on the command line, or None: ``init_dist`` runs before BasicSR reads it."""
    return _command_line_options()[1].get('num_gpu')


def command_line_dist_backend() -> str | None:
    """``dist_params.backend`` of the ``-opt`` file on the command line, or None (no file, no such key).

    basicsr's ``parse_options`` hands ``dist_params`` to ``init_dist`` only for ``--launcher slurm``; the
    replacement ``init_dist`` asks here so that torchrun runs honour it too."""
    path, opt = _command_line_options()
    if path is None:
        return None
    dist_params = opt.get('dist_params') or {}
    if not isinstance(dist_params, dict):
        raise OptionFileError(f'{path}: dist_params must be a mapping (backend: ..., port: ...), '
                              f'found {dist_params!r}.')
    return dist_params.get('backend')


def _check_exists(path: str | None) -> None:
    if path is not None and not os.path.isfile(path):
        what = 'is a directory' if os.path.isdir(path) else 'does not exist'
        raise OptionFileError(f'Option file {path!r} {what}; relative paths start from the '
                              f'current directory {os.getcwd()!r}.')


def check_num_gpu(opt: dict, opt_file: str) -> None:
    """``num_gpu`` (after BasicSR turned ``auto`` into the CUDA device count) must be an int this machine has."""
    num_gpu = opt['num_gpu']
    if isinstance(num_gpu, bool) or not isinstance(num_gpu, int) or num_gpu < 0:
        raise OptionFileError(f"{opt_file}: num_gpu: {num_gpu!r} is not valid; use 'auto' or an integer >= 0.")
    available = torch.cuda.device_count()
    if num_gpu > available:
        have = 'no CUDA device is' if available == 0 else f'only {available} CUDA device(s) are'
        raise OptionFileError(f'{opt_file}: num_gpu: {num_gpu}, but {have} available. Set `num_gpu: auto` '
                              f'(use the GPUs that are there, CPU if none) or `num_gpu: 0` (CPU).')


def check_tensorboard(opt: dict, opt_file: str) -> None:
    """``logger.use_tb_logger: true`` needs TensorBoard (an optional extra); BasicSR skips it for debug runs."""
    logger_opt = opt.get('logger') or {}
    if not logger_opt.get('use_tb_logger') or 'debug' in opt['name']:
        return
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError as err:
        raise OptionFileError(
            f'{opt_file}: logger.use_tb_logger is true but TensorBoard cannot be imported ({err}). Install it with '
            '`pip install tensorboard`, or set `use_tb_logger: false`.') from None


def run_pipeline(pipeline: Callable[[str], None], prog: str) -> None:
    """Run a BasicSR pipeline rooted at the current directory; a bad option file ends with its message (exit
    status 1) instead of a traceback."""
    try:
        pipeline(os.getcwd())
    except OptionFileError as err:
        sys.exit(f'{prog}: error: {err}')
