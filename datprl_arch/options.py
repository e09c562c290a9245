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
from .utils.allocator import keep_freed_memory

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
        self._reject_duplicate_keys(node)
        self.flatten_mapping(node)
        return OrderedDict(self.construct_pairs(node))

    def _reject_duplicate_keys(self, node: yaml.MappingNode) -> None:
        """A key written twice in one mapping: YAML keeps the last silently (``lr`` set twice, the first value
        ignored), so it is an error naming both lines. Keys merged in with ``<<:`` may be overridden."""
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == YAML_TAG_PREFIX + 'merge' or not isinstance(key_node, yaml.ScalarNode):
                continue
            if key_node.value in seen:
                mark = key_node.start_mark
                raise OptionFileError(f'{mark.name}, line {mark.line + 1}: key {key_node.value!r} is set twice in '
                                      f'one mapping (first on line {seen[key_node.value] + 1}); YAML would keep '
                                      'only the last value. Remove one of them.')
            seen[key_node.value] = key_node.start_mark.line

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
    """Read an option file safely (see ``OptionLoader``); a missing file or invalid YAML raises ``OptionFileError``."""
    _check_exists(path)
    with open(path, encoding='utf-8') as stream:
        try:
            return yaml.load(stream, Loader=OptionLoader)
        except yaml.YAMLError as err:
            raise OptionFileError(f'{path} is not valid YAML: {err}') from None


def ordered_yaml():
    """Drop-in for ``basicsr.utils.options.ordered_yaml``: the safe ``OptionLoader`` and BasicSR's own dumper."""
    basicsr_ordered_yaml = basicsr_options.ordered_yaml
    return OptionLoader, getattr(basicsr_ordered_yaml, 'basicsr_original', basicsr_ordered_yaml)()[1]


def parse_options(root_path: str, is_train: bool = True):
    """BasicSR's ``parse_options`` (same command line, same ``(opt, args)``) with the whole option file validated
    first (``datprl_arch.options_schema``: every problem named at once, before anything is built or written; again
    after ``--force_yml`` changed it), ``num_gpu`` / ``use_tb_logger`` checked against this machine, and the output
    folder checked for writing."""
    from .options_schema import validate

    path = _option_file_argument()
    _check_exists(path)
    if path is not None:
        validate(load_option_file(path), is_train, path)
    opt, args = basicsr_options.parse_options(root_path, is_train)
    if args.force_yml:
        validate(opt, is_train, f'{args.opt} (after --force_yml {" ".join(args.force_yml)})')
    check_num_gpu(opt, args.opt)
    if is_train:
        check_tensorboard(opt, args.opt)
    check_output_folder(opt, is_train)
    return opt, args


def check_output_folder(opt: dict, is_train: bool) -> None:
    """The run's ``experiments/<name>/`` (training) or ``results/<name>/`` (testing) can be written: checked on the
    rank that writes there, before BasicSR creates, moves or opens anything in it (:mod:`.utils.folders`)."""
    from .utils.folders import check_writable

    if opt.get('rank', 0) != 0:
        return
    if is_train:
        resuming = bool(opt.get('auto_resume') or opt['path'].get('resume_state'))
        check_writable(opt['path']['experiments_root'], 'the experiment folder', inside=resuming)
    else:
        check_writable(opt['path']['results_root'], 'the results folder')


def _option_file_argument() -> str | None:
    """The ``-opt`` value of the command line, or None (BasicSR's parser then reports it missing)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('-opt', type=str)
    return parser.parse_known_args()[0].opt


def command_line_overrides() -> dict[tuple[str, ...], object]:
    """The command line's ``--force_yml KEY[:KEY...]=VALUE`` entries as ``{keys: value}``, each value converted as
    BasicSR converts it (``60`` an int, ``true`` a bool, ``~`` None); malformed entries are left to BasicSR, which
    reports them when it applies the list (after ``init_dist``)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('--force_yml', nargs='+', default=[])
    overrides = {}
    for entry in parser.parse_known_args()[0].force_yml:
        if entry.count('=') != 1:
            continue
        keys, value = (part.strip() for part in entry.split('='))
        try:
            overrides[tuple(keys.split(':'))] = basicsr_options._postprocess_yml_value(value)
        except (SyntaxError, NameError, TypeError, ValueError):  # a list BasicSR's eval cannot read: it says so later
            continue
    return overrides


def _command_line_options() -> tuple[str | None, dict]:
    """The ``-opt`` file on the command line and its options (``(None, {})`` without one), with the ``--force_yml``
    entries for ``num_gpu`` and ``dist_params`` applied: ``init_dist`` reads these before BasicSR applies the
    command line's overrides (basicsr utils/options.py applies ``--force_yml`` after starting the process group)."""
    path = _option_file_argument()
    if path is None or not os.path.isfile(path):
        return None, {}
    opt = load_option_file(path)
    for keys, value in command_line_overrides().items():
        if keys == ('num_gpu',):
            opt['num_gpu'] = value
        elif len(keys) == 2 and keys[0] == 'dist_params' and isinstance(opt.get('dist_params') or {}, dict):
            opt['dist_params'] = dict(opt.get('dist_params') or {}, **{keys[1]: value})
    return path, opt


def command_line_num_gpu():
    """``num_gpu`` of the command line (``--force_yml num_gpu=N``, else the ``-opt`` file's), or None:
    ``init_dist`` runs before BasicSR reads it."""
    return _command_line_options()[1].get('num_gpu')


def command_line_dist_params() -> dict:
    """``dist_params`` of the ``-opt`` file on the command line with its ``--force_yml dist_params:KEY=VALUE``
    entries applied (``{}`` without a file or the key).

    basicsr's ``parse_options`` hands the file's ``dist_params`` to ``init_dist`` only for ``--launcher slurm``,
    and applies ``--force_yml`` only afterwards; the replacement ``init_dist`` asks here so that torchrun runs honour
    ``backend`` and ``timeout`` too, and both launchers the command line's overrides."""
    path, opt = _command_line_options()
    if path is None:
        return {}
    dist_params = opt.get('dist_params') or {}
    if not isinstance(dist_params, dict):
        raise OptionFileError(f'{path}: dist_params must be a mapping (backend: ..., port: ...), '
                              f'found {dist_params!r}.')
    return dict(dist_params)


def command_line_dist_backend() -> str | None:
    """``dist_params.backend`` of the ``-opt`` file on the command line, or None (no file, no such key)."""
    return command_line_dist_params().get('backend')


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


def run_pipeline(pipeline: Callable[[str], None], prog: str, errors: tuple = ()) -> None:
    """Run a BasicSR pipeline rooted at the current directory. This package's own errors (``DatprlError``: a bad
    option file, data, checkpoint or training state) and those of ``errors`` (exception types whose message names
    the file at fault) end with their message (exit status 1) instead of a traceback; ``--debug`` (BasicSR's flag)
    shows the traceback. Freed memory stays in the process for reuse (:mod:`.utils.allocator`)."""
    keep_freed_memory()
    try:
        pipeline(os.getcwd())
    except (DatprlError, *errors) as err:
        if '--debug' in sys.argv:
            raise
        sys.exit(f'{prog}: error: {error_message(err)}')


def error_message(err: BaseException) -> str:
    """The message of ``err`` without the worker traceback PyTorch puts in front of an error re-raised from a
    DataLoader worker process."""
    text = str(err)
    if 'Original Traceback' not in text:
        return text
    for name in (f'{type(err).__module__}.{type(err).__qualname__}: ', f'{type(err).__name__}: '):
        if name in text:
            return text[text.rindex(name) + len(name):].strip()
    return text
