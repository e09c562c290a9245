"""Validation of a whole option file before anything is built or written.

BasicSR reads option values where it uses them, so a misspelled required key (``total_iters``, ``netwrok_g``,
``val_frq``), a bare ``lr: 1e-3`` (YAML 1.1 reads it as a string), ``total_iter: six`` or a missing
``datasets.train`` end in a raw ``KeyError``/``TypeError`` minutes into a run, or not at all. :func:`validate`
checks every section against what BasicSR 1.4.2 and this plugin read and reports all problems at once in one
:class:`~datprl_arch.options.OptionFileError` that names the file, the key (``section.key``), what was found and
what is expected, with a "did you mean" for near misses.

Unknown keys are errors where the reader of a section is known (BasicSR's ``SRModel``/``SRGANModel`` family and
this plugin's model and dataset; the ``train:`` keys of ``DATPRLModel`` are its ``TRAIN_KEYS``); for other types
(other plugins, BasicSR's video and GAN-degradation models) only keys that are near misses of known ones are
reported. Constructor arguments of ``network_g``, losses, optimizers and schedulers are checked against the
signatures of the registered classes. Where options name modules or parameters of the network (a PromptedBackbone's
taps and injection points, ``train.freeze`` and the stages' ``freeze``), ``network_g`` is built on the CPU to resolve
them (well under a second for this package's networks). Files named by options are checked where they are read.
"""
from __future__ import annotations

import difflib
import inspect
import math
import re
from typing import Any, Iterable, Mapping, Optional

from .utils.problems import problems_message

#: Keys BasicSR's ``parse_options`` and the runners add; accepted everywhere they appear.
RUNTIME_KEYS = ('dist', 'rank', 'world_size', 'auto_resume', 'is_train', 'root_path', 'resume_position')
RUNTIME_PATH_KEYS = ('experiments_root', 'models', 'training_states', 'log', 'visualization', 'results_root')
TOP_KEYS = ('name', 'model_type', 'scale', 'num_gpu', 'manual_seed', 'datasets', 'network_g', 'network_d', 'path',
            'train', 'val', 'logger', 'dist_params', 'find_unused_parameters')
PATH_KEYS = ('resume_state', 'ignore_resume_networks', 'strict_load', 'param_key')
#: ``path`` keys per network: pretrain_network_g, param_key_g, strict_load_g (and _d, ...).
_NETWORK_PATH_KEY = re.compile(r'^(pretrain_network|param_key|strict_load)_\w+$')
LOGGER_KEYS = ('print_freq', 'save_checkpoint_freq', 'use_tb_logger', 'wandb')
VAL_KEYS = ('val_freq', 'save_img', 'suffix', 'metrics', 'pbar', 'center_frame_only', 'flip_seq', 'num_val_samples',
            'num_val_datasets', 'prompt_analysis', 'prompt_analysis_save_path', 'max_pixels')
DIST_KEYS = ('backend', 'port', 'timeout')
#: What BasicSR's ``build_dataloader`` / ``parse_options`` read of every dataset entry.
LOADER_KEYS = ('name', 'type', 'phase', 'scale', 'batch_size_per_gpu', 'num_worker_per_gpu', 'dataset_enlarge_ratio',
               'prefetch_mode', 'pin_memory', 'persistent_workers', 'num_prefetch_queue', 'use_shuffle')
#: Dataset-level keys of DATPRLMultiDomainDataset (``batch_size``: the official files' print-only quota).
MULTIDOMAIN_KEYS = ('datasets', 'gt_size', 'use_hflip', 'use_rot', 'channels', 'sampling', 'sampling_seed',
                    'domains', 'tasks', 'verify_images', 'color', 'mean', 'std', 'batch_size', 'photometric')
#: Keys of BasicSR's own paired and single-image datasets.
BASICSR_DATASET_KEYS = {
    'PairedImageDataset': ('dataroot_gt', 'dataroot_lq', 'meta_info_file', 'io_backend', 'filename_tmpl', 'gt_size',
                           'use_hflip', 'use_rot', 'color', 'mean', 'std'),
    'SingleImageDataset': ('dataroot_lq', 'meta_info_file', 'io_backend', 'color', 'mean', 'std'),
}
GAN_TRAIN_KEYS = ('optim_d', 'gan_opt', 'ldl_opt', 'net_d_iters', 'net_d_init_iters')
#: Optimizers and schedulers of basicsr 1.4.2's ``BaseModel``.
BASICSR_OPTIMIZERS = ('Adam',)
BASICSR_SCHEDULERS = ('MultiStepLR', 'MultiStepRestartLR', 'CosineAnnealingRestartLR')
#: A string YAML 1.1 did not read as a number although it looks like one (``1e-3``, ``2E4``).
_EXPONENT = re.compile(r'^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$')
#: Keys whose values are names, never numbers.
_NAME_KEYS = ('name', 'suffix', 'domain', 'task', 'domains', 'tasks', 'filename_tmpl', 'type', 'model_type')
#: A message that starts with the option it is about (``taps.task: ...``).
_LEADING_KEY = re.compile(r'^([A-Za-z_][\w.\[\]]*): ')
#: How close an unknown key must be to a known one to be called a misspelling of it.
NEAR_MISS = 0.75
#: Problems listed before the rest is summarised.
MAX_PROBLEMS = 25


def _suggestion(key: Any, accepted: Iterable[Any]) -> Optional[str]:
    """The accepted name closest to ``key`` (ignoring case), if it is close enough to be a misspelling."""
    by_lower = {str(a).lower(): str(a) for a in accepted}
    close = difflib.get_close_matches(str(key).lower(), list(by_lower), n=1, cutoff=NEAR_MISS)
    return by_lower[close[0]] if close else None


def _found(value: Any) -> str:
    if isinstance(value, str):
        return f'the string {value!r}'
    if value is None:
        return 'nothing (~)'
    if isinstance(value, Mapping):
        return 'a mapping'
    if isinstance(value, (list, tuple)):
        return f'a list of {len(value)} item(s)'
    return f'{type(value).__name__} {value!r}'


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Checker:
    """Collects problems of one option file as ``(dotted key, message)``; :meth:`raise_if_any` reports them."""

    def __init__(self, option_file: str):
        self.option_file = option_file
        self.problems: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.problems.append(f'{where}: {message}' if where else message)

    def raise_if_any(self) -> None:
        if not self.problems:
            return
        from .options import OptionFileError
        raise OptionFileError(problems_message(
            f'{self.option_file}: {len(self.problems)} problem(s) in the option file (nothing was run):',
            self.problems, MAX_PROBLEMS))

    # ------------------------------------------------------------ building blocks
    def section(self, where: str, value: Any, what: str) -> Optional[Mapping]:
        """``value`` when it is a mapping; else a problem (``what`` describes the expected content)."""
        if isinstance(value, Mapping):
            return value
        self.add(where, f'found {_found(value)}, expected a mapping ({what}).')
        return None

    def keys(self, where: str, section: Mapping, accepted: Iterable[str], required: Iterable[str] = (),
             complete: bool = True, hints: Optional[Mapping[str, str]] = None) -> None:
        """Missing ``required`` keys, and unknown keys: all of them when ``accepted`` is ``complete``, else only
        near misses of accepted ones. A missing key with a near-miss sibling is reported once, as a misspelling."""
        accepted = list(accepted)
        known = set(accepted) | set(RUNTIME_KEYS)
        hints = hints or {}
        misspelt = {}
        for key in section:
            if key in known:
                continue
            close = _suggestion(key, accepted)
            if close is not None:
                if close not in section:
                    misspelt.setdefault(close, key)
                    if close in required:
                        continue
                also = ', which is set too' if close in section else ''
                self.add(_join(where, key), f'unknown key (did you mean `{close}`{also}?).')
            elif key in hints:
                self.add(_join(where, key), hints[key])
            elif complete:
                self.add(_join(where, key), f'unknown key; accepted keys here: {", ".join(sorted(accepted))}.')
        for key in required:
            if key not in section:
                typo = f' (found `{misspelt[key]}`: a misspelling?)' if key in misspelt else ''
                self.add(_join(where, key), f'missing{typo}; expected {REQUIRED_WHAT.get(key, "a value")}.')

    def number(self, where: str, value: Any, *, integer: bool = False, minimum: float = -math.inf,
               above: Optional[float] = None, maximum: float = math.inf, below: Optional[float] = None,
               none: bool = False) -> None:
        """A finite number (an integral one with ``integer``) in the given bounds; None is fine with ``none``."""
        if value is None and none:
            return
        bounds = [f'>= {minimum:g}' if minimum > -math.inf else '', f'> {above:g}' if above is not None else '',
                  f'<= {maximum:g}' if maximum < math.inf else '', f'< {below:g}' if below is not None else '']
        expected = f'{"an integer" if integer else "a number"} {" and ".join(b for b in bounds if b)}'.strip()
        if none:
            expected += ' (or ~)'
        if not _is_number(value) or not math.isfinite(value) or (integer and value != int(value)) \
                or value < minimum or value > maximum or (above is not None and value <= above) \
                or (below is not None and value >= below):
            hint = ''
            if isinstance(value, str) and _EXPONENT.match(value.strip()):
                hint = (f' (YAML 1.1 reads an exponent without a decimal point as a string: write '
                        f'`!!float {value.strip()}`)')
            self.add(where, f'found {_found(value)}, expected {expected}{hint}.')

    def flag(self, where: str, value: Any) -> None:
        if not isinstance(value, bool):
            self.add(where, f'found {_found(value)}, expected true or false.')

    def choice(self, where: str, value: Any, choices: Iterable, what: str = 'one of') -> bool:
        choices = list(choices)
        if value in choices:
            return True
        close = _suggestion(value, [c for c in choices if isinstance(c, str)]) if isinstance(value, str) else None
        guess = f' (did you mean `{close}`?)' if close else ''
        self.add(where, f'found {_found(value)}{guess}, expected {what} {", ".join(map(str, choices))}.')
        return False

    def typed(self, where: str, section: Mapping, registry, kind: str, skip: Iterable[str] = ('type',),
              given: Iterable[str] = ()) -> Optional[type]:
        """``section.type`` names a class of ``registry``; its other keys must be arguments of that class (unless it
        takes ``**kwargs``) and its required arguments present (``given`` are passed by the caller). Returns the
        class, or None."""
        name = section.get('type')
        if name is None:
            self.add(_join(where, 'type'), f'missing; expected the name of a registered {kind}.')
            return None
        if not self.registered(_join(where, 'type'), name, registry, kind):
            return None
        target = registry._obj_map[name]
        self.arguments(where, section, target, kind, skip, given)
        return target

    def registered(self, where: str, name: Any, registry, kind: str) -> bool:
        """``name`` is registered in BasicSR's ``registry``; else a problem with a "did you mean"."""
        names = list(registry._obj_map)
        if isinstance(name, str) and name in names:
            return True
        close = _suggestion(name, names) if isinstance(name, str) else None
        guess = f'did you mean `{close}`? ' if close else ''
        self.add(where, f'{_found(name)} is not a registered {kind} ({guess}a plugin must be imported before BasicSR '
                 'builds it).')
        return False

    def arguments(self, where: str, section: Mapping, target, kind: str, skip: Iterable[str] = ('type',),
                  given: Iterable[str] = ()) -> None:
        """The keys of ``section`` (except ``skip``) against the signature of ``target``."""
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):
            return
        params = signature.parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return
        names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        for key in section:
            if key in skip or key in names:
                continue
            close = _suggestion(key, names)
            guess = f'did you mean `{close}`? ' if close else ''
            self.add(_join(where, key), f'{target.__name__} ({kind}) takes no argument `{key}` ({guess}its '
                     f'arguments: {", ".join(n for n in names if n not in given)}).')
        for n, p in params.items():
            if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in section \
                    and n not in given:
                self.add(_join(where, n), f'missing; {target.__name__} ({kind}) needs it.')


#: What a required key holds, for the "missing" messages.
REQUIRED_WHAT = {
    'name': 'the run name (experiments/<name>/, results/<name>/)', 'model_type': 'a registered model, e.g. DATPRLModel',
    'num_gpu': "'auto' or an integer >= 0", 'datasets': 'a mapping of phases (train, val_1, test_1, ...) to datasets',
    'path': 'a mapping (pretrain_network_g: ~, resume_state: ~, ...)', 'network_g': 'the network (type: ..., ...)',
    'train': 'the training options (optim_g, scheduler, total_iter, losses)',
    'logger': 'a mapping (print_freq, save_checkpoint_freq, use_tb_logger)',
    'total_iter': 'the number of training iterations, an integer >= 1', 'optim_g': 'the optimizer (type, lr, ...)',
    'scheduler': 'the learning-rate schedule (type, ...)', 'lr': 'the learning rate, a number > 0',
    'print_freq': 'an integer >= 1 (iterations between log lines)',
    'save_checkpoint_freq': 'an integer >= 1 (iterations between checkpoints)',
    'val_freq': 'an integer >= 1 (iterations between validations)', 'save_img': 'true or false',
    'batch_size_per_gpu': 'an integer >= 1', 'num_worker_per_gpu': 'an integer >= 0',
    'type': 'a registered name',
    'val': "a mapping (save_img: false, metrics: ...); BasicSR's test runner reads val.save_img",
}


def _join(where: str, key: Any) -> str:
    return f'{where}.{key}' if where else str(key)


# ---------------------------------------------------------------- sections
def _model_family(model_type: Any) -> tuple[Optional[tuple], Optional[tuple], Optional[tuple], bool]:
    """``(train keys, optimizers, schedulers, ours)`` of a model type; None where the model is not known here."""
    from basicsr.models.sr_model import SRModel
    from basicsr.models.srgan_model import SRGANModel
    from basicsr.utils.registry import MODEL_REGISTRY

    from .models.datprl_model import BASICSR_TRAIN_KEYS, TRAIN_KEYS, DATPRLModel
    from .models.optim import OPTIMIZERS, SCHEDULERS

    cls = MODEL_REGISTRY._obj_map.get(model_type) if isinstance(model_type, str) else None
    if cls is None:
        return None, None, None, False
    if issubclass(cls, DATPRLModel):
        return TRAIN_KEYS, tuple(OPTIMIZERS), tuple(SCHEDULERS), True
    if issubclass(cls, SRGANModel) and cls.__module__ in ('basicsr.models.srgan_model', 'basicsr.models.esrgan_model'):
        return BASICSR_TRAIN_KEYS + GAN_TRAIN_KEYS, BASICSR_OPTIMIZERS, BASICSR_SCHEDULERS, False
    if cls.__module__ in ('basicsr.models.sr_model', 'basicsr.models.swinir_model') and issubclass(cls, SRModel):
        return BASICSR_TRAIN_KEYS, BASICSR_OPTIMIZERS, BASICSR_SCHEDULERS, False
    return None, None, None, False


def _check_top(c: Checker, opt: Mapping, is_train: bool, known_model: bool) -> None:
    required = ['name', 'model_type', 'num_gpu', 'datasets', 'path']
    if known_model:
        required.append('network_g')
    if is_train:
        required += ['train', 'logger']
    if not is_train:
        required.append('val')
    networks = [k for k in opt if isinstance(k, str) and k.startswith('network_')]
    c.keys('', opt, TOP_KEYS + tuple(networks), required, complete=known_model)
    if 'name' in opt and (not isinstance(opt['name'], str) or not opt['name']):
        c.add('name', f'found {_found(opt["name"])}, expected a non-empty text (the run name).')
    if 'scale' in opt:
        c.number('scale', opt['scale'], integer=True, minimum=1)
    if 'manual_seed' in opt:
        c.number('manual_seed', opt['manual_seed'], integer=True, minimum=0, none=True)
    if 'find_unused_parameters' in opt:
        c.flag('find_unused_parameters', opt['find_unused_parameters'])
    if 'dist_params' in opt and c.section('dist_params', opt['dist_params'], 'backend: ..., port: ...'):
        c.keys('dist_params', opt['dist_params'], DIST_KEYS)


def _check_path(c: Checker, opt: Mapping) -> None:
    path = c.section('path', opt['path'], 'pretrain_network_g: ~, strict_load_g: true, resume_state: ~')
    if path is None:
        return
    for key, value in path.items():
        if key in PATH_KEYS + RUNTIME_PATH_KEYS or _NETWORK_PATH_KEY.match(str(key)):
            if str(key).startswith('strict_load'):
                c.flag(f'path.{key}', value)
            elif str(key).startswith('pretrain_network') and value is not None and not isinstance(value, str):
                c.add(f'path.{key}', f'found {_found(value)}, expected a checkpoint file path (or ~).')
            continue
        close = _suggestion(key, ('pretrain_network_g', 'param_key_g', 'strict_load_g') + PATH_KEYS)
        guess = f'did you mean `{close}`? ' if close else ''
        c.add(f'path.{key}', f'unknown key ({guess}accepted: pretrain_network_<net>, param_key_<net>, '
              f'strict_load_<net>, resume_state, ignore_resume_networks).')


def _check_network(c: Checker, opt: Mapping) -> None:
    from basicsr.utils.registry import ARCH_REGISTRY

    from .archs.prompted_backbone_arch import DUAL_POOL, PROMPT_MODES

    for key in [k for k in opt if isinstance(k, str) and k.startswith('network_')]:
        section = c.section(key, opt[key], 'type: <registered network>, and its arguments')
        if section is None or c.typed(key, section, ARCH_REGISTRY, 'network') is None \
                or section['type'] != 'PromptedBackbone':
            continue
        if isinstance(section.get('backbone'), Mapping):
            c.typed(f'{key}.backbone', section['backbone'], ARCH_REGISTRY, 'network')  # the wrapped network
        prompt = section.get('prompt')
        if isinstance(prompt, Mapping) and 'type' in prompt:
            c.choice(f'{key}.prompt.type', prompt['type'], [DUAL_POOL, *PROMPT_MODES])


def _network_needed(opt: Mapping, is_train: bool) -> bool:
    """Whether checking the file needs ``network_g`` built: a PromptedBackbone (its taps and injection points name
    modules of the backbone) or, in training, ``freeze`` lists (they name parameters)."""
    network = opt.get('network_g')
    if not isinstance(network, Mapping):
        return False
    if network.get('type') == 'PromptedBackbone':
        return True
    train = opt.get('train') if is_train else None
    if not isinstance(train, Mapping):
        return False
    stages = train.get('stages') if isinstance(train.get('stages'), list) else []
    return bool(train.get('freeze')) or any(isinstance(s, Mapping) and s.get('freeze') for s in stages)


def _build_network(c: Checker, network: Mapping):
    """``network_g`` built on the CPU (cheap for the networks of this package: well under a second), or None with a
    problem naming ``network_g`` when its options do not build (a tap or injection point naming no module, ...)."""
    from .errors import DatprlError
    from .utils.network_probe import build_quietly

    try:
        return build_quietly(network)
    except DatprlError as err:
        key = _LEADING_KEY.match(str(err))  # 'taps.task: ...' -> network_g.taps.task
        where, message = ('network_g.' + key[1], str(err)[key.end():]) if key else ('network_g', str(err))
        c.add(where, message.rstrip('.') + '.')
    except (ValueError, TypeError, KeyError, RuntimeError, AssertionError) as err:
        c.add('network_g', f"{network['type']} cannot be built from these options ({type(err).__name__}: {err}).")
    return None


def _check_frozen(c: Checker, train: Mapping, net) -> None:
    """``train.freeze`` and every ``train.stages[i].freeze`` name parts of ``network_g``'s parameters, and no stage
    leaves nothing to train: the checks the model makes when it freezes, before any data is read."""
    from .archs.prompt import dead_parameter_names
    from .models.optim import check_trainable, resolve_parts
    from .models.stages import parse_stages

    def frozen(where: str, parts) -> Optional[set]:
        if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
            c.add(where, f'found {_found(parts)}, expected a list of parts (backbone, prompts or parameter-name '
                  'prefixes).')
            return None
        found = set()
        for part in parts:
            try:
                found |= resolve_parts(net, [part], where)
            except ValueError as err:
                c.add(where, str(err).partition(': ')[2] + '.')
        return found

    def trainable(where: str, names: set, what: str) -> bool:
        try:
            check_trainable(net, names, where, what)
        except ValueError as err:
            c.add(where, str(err).partition(': ')[2] + '.')
            return False
        return True

    dead, base_parts = dead_parameter_names(net), train.get('freeze')
    base = frozen('train.freeze', base_parts) if base_parts is not None else set()
    if base is None or not trainable('train.freeze', base | dead, f'freezing {base_parts}'):
        return
    total = train.get('total_iter')
    try:
        stages = parse_stages(train.get('stages'), total if isinstance(total, int) else 1)
    except ValueError:
        return  # _check_stages reported it
    for stage in stages:
        where = f'train.stages[{stage.index}].freeze'
        parts = frozen(where, list(stage.freeze))
        if parts is not None:
            trainable(where, base | parts | dead, stage.freezing(base_parts or ()))


def _check_train(c: Checker, train: Mapping, train_keys, optimizers, schedulers, ours: bool,
                 train_tasks: Optional[set] = None) -> None:
    from basicsr.utils.registry import LOSS_REGISTRY

    from .losses.pixel_weighting import PIXEL_WEIGHTINGS
    from .models.datprl_model import AMP_DTYPES, TRAIN_KEYS
    from .models.optim import OPTIMIZERS, SCHEDULERS
    from .models.prompt_objectives import ALIGNMENT_TARGETS
    from .priors.training import TEXT_ENCODERS, clip_constraint_problem

    accepted = train_keys if train_keys is not None else TRAIN_KEYS + GAN_TRAIN_KEYS
    c.keys('train', train, accepted, ('total_iter', 'optim_g', 'scheduler'), complete=train_keys is not None)
    if 'total_iter' in train:
        c.number('train.total_iter', train['total_iter'], integer=True, minimum=1)
    if 'warmup_iter' in train:
        c.number('train.warmup_iter', train['warmup_iter'], integer=True, minimum=-1, none=True)
    if 'ema_decay' in train:
        c.number('train.ema_decay', train['ema_decay'], minimum=0, below=1, none=True)
    for key, kinds, registry in (('optim_g', optimizers, OPTIMIZERS), ('optim_d', optimizers, OPTIMIZERS),
                                 ('scheduler', schedulers, SCHEDULERS)):
        if key not in train:
            continue
        section = c.section(f'train.{key}', train[key], 'type: ..., and its arguments')
        if section is None:
            continue
        if key.startswith('optim'):
            if 'lr' not in section:
                c.add(f'train.{key}.lr', f'missing; expected {REQUIRED_WHAT["lr"]}.')
            else:
                c.number(f'train.{key}.lr', section['lr'], above=0)
        if kinds is None:
            continue
        name = section.get('type')
        if c.choice(f'train.{key}.type', name, kinds, 'one of') and name in registry:
            given = ('params', 'optimizer')
            c.arguments(f'train.{key}', section, registry[name], 'optimizer' if key != 'scheduler' else 'scheduler',
                        given=given)
    for key in [k for k in train if str(k).endswith('_opt')]:
        section = c.section(f'train.{key}', train[key], 'type: <registered loss>, loss_weight: ..., ...')
        if section is None:
            continue
        if c.typed(f'train.{key}', section, LOSS_REGISTRY, 'loss') and 'loss_weight' in section:
            c.number(f'train.{key}.loss_weight', section['loss_weight'], minimum=0)
    if not ours:
        return
    for key in ('prompt_diversity_weight', 'prompt_balance_weight', 'prompt_contrastive_weight',
                'clip_alignment_weight'):
        if key in train:
            c.number(f'train.{key}', train[key], minimum=0, none=True)
    for key in ('diversity_temperature', 'contrastive_temperature', 'alignment_temperature'):
        if key in train:
            c.number(f'train.{key}', train[key], above=0)
    for key in ('prompt_lr', 'grad_clip'):
        if key in train:
            c.number(f'train.{key}', train[key], above=0, none=True)
    for key in ('max_nonfinite_steps', 'stats_update_freq', 'prompt_analysis_freq'):
        if key in train:
            c.number(f'train.{key}', train[key], integer=True, minimum=1, none=key == 'prompt_analysis_freq')
    for key in ('use_amp', 'use_clip_constraint', 'reinit_prompts', 'enable_prompt_analysis', 'compile', 'tf32'):
        if key in train:
            c.flag(f'train.{key}', train[key])
    if train.get('pixel_weighting') is not None:
        c.choice('train.pixel_weighting', train['pixel_weighting'], PIXEL_WEIGHTINGS)
    for key in ('pixel_weight_floor', 'pixel_weight_power'):  # weights max(error, floor) ** -power: both > 0
        if key in train:
            c.number(f'train.{key}', train[key], above=0)
    if train.get('use_amp') and 'amp_dtype' in train:
        c.choice('train.amp_dtype', train['amp_dtype'], sorted(AMP_DTYPES))
    if 'alignment_target' in train:
        c.choice('train.alignment_target', train['alignment_target'], ALIGNMENT_TARGETS)
    if train.get('text_encoder') is not None:
        c.choice('train.text_encoder', train['text_encoder'], [e for e in TEXT_ENCODERS if e])
    why = clip_constraint_problem(train)
    if why:
        c.add('train', why + '.')
    if 'stages' in train:
        _check_stages(c, train, train_tasks)


def _train_tasks(opt: Mapping) -> Optional[set]:
    """The task names of the multi-domain training set (its ``tasks`` list, else its sources' ``task``, official
    files: their ``name``); None when the file does not say."""
    train = (opt.get('datasets') or {}).get('train') if isinstance(opt.get('datasets'), Mapping) else None
    if not isinstance(train, Mapping):
        return None
    if isinstance(train.get('tasks'), list):
        return {str(t) for t in train['tasks']}
    sources = train.get('datasets')
    if not isinstance(sources, list) or not all(isinstance(s, Mapping) for s in sources):
        return None
    return {str(s.get('task', s.get('name'))) for s in sources}


def _check_stages(c: Checker, train: Mapping, train_tasks: Optional[set]) -> None:
    """``train.stages`` as the training model parses it, and every stage's tasks among the training set's."""
    from .models.stages import parse_stages

    total = train.get('total_iter')
    try:
        stages = parse_stages(train['stages'], total if isinstance(total, int) else 1)
    except ValueError as err:
        where, _, message = str(err).partition(' ')
        c.add(where.rstrip(':'), message)
        return
    for stage in stages:
        unknown = [t for t in stage.tasks or () if train_tasks is not None and t not in train_tasks]
        if unknown:
            c.add(f'train.stages[{stage.index}].tasks', f'{unknown[0]!r} is not a task of datasets.train (its tasks: '
                  f'{sorted(train_tasks)}).')


def _check_logger(c: Checker, logger: Mapping, is_train: bool) -> None:
    c.keys('logger', logger, LOGGER_KEYS, ('print_freq', 'save_checkpoint_freq') if is_train else ())
    for key in ('print_freq', 'save_checkpoint_freq'):
        if key in logger:
            c.number(f'logger.{key}', logger[key], integer=True, minimum=1)
    if 'use_tb_logger' in logger:
        c.flag('logger.use_tb_logger', logger['use_tb_logger'])


def _check_val(c: Checker, val: Mapping, is_train: bool, ours: bool, srmodel: bool) -> None:
    from basicsr.utils.registry import METRIC_REGISTRY

    c.keys('val', val, VAL_KEYS, ('val_freq', 'save_img') if is_train else ('save_img',), complete=ours or srmodel)
    if is_train and 'val_freq' in val:
        c.number('val.val_freq', val['val_freq'], integer=True, minimum=1)
    if val.get('max_pixels') is not None:  # tiles of the restore command's automatic side must exceed their overlap
        from .inference.whole_image import min_tiled_pixels
        c.number('val.max_pixels', val['max_pixels'], integer=True, minimum=min_tiled_pixels())
    if 'save_img' in val:
        c.flag('val.save_img', val['save_img'])
        if srmodel and val['save_img'] and not is_train and 'suffix' not in val:
            c.add('val.suffix', "missing: BasicSR's SRModel reads it when save_img is true; write `suffix: ~`.")
    metrics = val.get('metrics')
    if metrics is None:
        return
    if c.section('val.metrics', metrics, 'metric name -> type: calculate_psnr, crop_border: 0, ...') is None:
        return
    for name, metric in metrics.items():
        section = c.section(f'val.metrics.{name}', metric, 'type: calculate_psnr, crop_border: 0, ...')
        if section is not None:
            target = c.typed(f'val.metrics.{name}', section, METRIC_REGISTRY, 'metric', given=('img', 'img2'))
            if target is not None and 'crop_border' not in section:
                c.add(f'val.metrics.{name}.crop_border', 'missing; BasicSR\'s metrics need it (e.g. 0).')


def _check_dataset(c: Checker, where: str, ds: Mapping, phase: str) -> None:
    from basicsr.utils.registry import DATASET_REGISTRY

    from .data.multidomain_dataset import OFFICIAL_NAMES, DATPRLMultiDomainDataset
    from .data.sources import dataset_problems, parse_source

    kind = ds.get('type')
    ours = DATASET_REGISTRY._obj_map.get(kind) is DATPRLMultiDomainDataset if isinstance(kind, str) else False
    if kind is None:
        c.add(f'{where}.type', 'missing; expected a registered dataset, e.g. DATPRLMultiDomainDataset.')
    elif not c.registered(f'{where}.type', kind, DATASET_REGISTRY, 'dataset'):
        return
    own = MULTIDOMAIN_KEYS if ours else BASICSR_DATASET_KEYS.get(kind)
    required = ['name'] + (['batch_size_per_gpu', 'num_worker_per_gpu'] if phase == 'train' else [])
    hints = {k: f'belongs to each source under `datasets:` ({kind} reads a list of sources).'
             for k in ('dataroot_gt', 'dataroot_lq', 'io_backend', 'filename_tmpl', 'meta_info_file')} if ours else {}
    c.keys(where, ds, LOADER_KEYS + tuple(own or ()), required, complete=own is not None, hints=hints)
    if 'name' in ds and not isinstance(ds['name'], str):
        c.add(f'{where}.name', f'found {_found(ds["name"])}, expected a text.')
    for key, minimum in (('batch_size_per_gpu', 1), ('num_worker_per_gpu', 0), ('gt_size', 1)):
        if key in ds and (phase == 'train' or key != 'gt_size' or ds[key] is not None):
            c.number(f'{where}.{key}', ds[key], integer=True, minimum=minimum)
    if 'dataset_enlarge_ratio' in ds:
        c.number(f'{where}.dataset_enlarge_ratio', ds['dataset_enlarge_ratio'], above=0)
    for key in ('use_hflip', 'use_rot', 'pin_memory', 'persistent_workers', 'verify_images'):
        if key in ds:
            c.flag(f'{where}.{key}', ds[key])
    if 'prefetch_mode' in ds:
        c.choice(f'{where}.prefetch_mode', ds['prefetch_mode'], (None, 'cpu', 'cuda'))
    if not ours:
        return
    if phase == 'train' and 'gt_size' not in ds:
        c.add(f'{where}.gt_size', 'missing; expected the GT crop side in pixels for training, e.g. 128.')
    if 'channels' in ds:
        c.choice(f'{where}.channels', ds['channels'], (1, 3))
    sources = ds.get('datasets')
    if not isinstance(sources, list) or not sources:
        c.add(f'{where}.datasets', f'found {_found(sources)}, expected a non-empty list of sources (name, domain, '
              'task, dataroot_gt, dataroot_lq, io_backend, ...).')
        return
    problems = dataset_problems(where)
    for index, source in enumerate(sources):
        parse_source(source, index, problems, kind in OFFICIAL_NAMES)
    for item in problems.items:
        c.add(f'{where}.datasets', item)


def _check_datasets(c: Checker, datasets: Mapping, is_train: bool) -> None:
    if not datasets:
        c.add('datasets', 'is empty; expected at least one dataset (train, val_1, test_1, ...).')
        return
    if is_train and 'train' not in datasets:
        c.add('datasets.train', f'missing; a training run needs a train dataset (found: {", ".join(datasets)}).')
    names = {}
    for key, ds in datasets.items():
        phase = str(key).split('_')[0]
        where = f'datasets.{key}'
        if is_train and key != 'train' and phase != 'val':
            close = _suggestion(key, ('train', 'val'))
            guess = f'did you mean `{close}`? ' if close else ''
            c.add(where, f'a training run reads `train` and `val*` datasets only ({guess}test sets go into a test '
                  'option file).')
            continue
        section = c.section(where, ds, 'name, type, and the dataset options')
        if section is None:
            continue
        _check_dataset(c, where, section, phase)
        if phase != 'train' and isinstance(section.get('name'), str):
            if section['name'] in names:
                c.add(f'{where}.name', f"{section['name']!r} is also the name of {names[section['name']]}: "
                      'validation/test sets need distinct names (their metrics, averages and images are kept by '
                      'name).')
            names.setdefault(section['name'], where)


def _check_strings(c: Checker, node: Any, where: str = '') -> None:
    """Exponent numbers that YAML read as strings (``1e-3``), anywhere but under name-like keys."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key not in _NAME_KEYS:
                _check_strings(c, value, _join(where, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_strings(c, value, f'{where}[{i}]')
    elif isinstance(node, str) and _EXPONENT.match(node.strip()) and \
            not any(p.startswith(f'{where}:') for p in c.problems):
        c.add(where, f'found the string {node!r}: YAML 1.1 reads an exponent without a decimal point as a string; '
              f'write `!!float {node.strip()}` if a number is meant.')


def validate(opt: Mapping, is_train: bool, option_file: str = '<option file>') -> None:
    """Check a whole option file (as loaded, or as BasicSR's ``parse_options`` leaves it); raise one
    ``OptionFileError`` listing every problem (see the module docstring)."""
    c = Checker(option_file)
    train_keys, optimizers, schedulers, ours = _model_family(opt.get('model_type'))
    known_model = train_keys is not None
    from basicsr.utils.registry import MODEL_REGISTRY

    _check_top(c, opt, is_train, known_model or 'model_type' not in opt)
    if 'model_type' in opt:
        c.registered('model_type', opt['model_type'], MODEL_REGISTRY, 'model')
    if 'path' in opt:
        _check_path(c, opt)
    before = len(c.problems)
    _check_network(c, opt)
    net = _build_network(c, opt['network_g']) if len(c.problems) == before and _network_needed(opt, is_train) \
        else None
    if 'datasets' in opt and c.section('datasets', opt['datasets'], REQUIRED_WHAT['datasets']) is not None:
        _check_datasets(c, opt['datasets'], is_train)
    if is_train and isinstance(opt.get('train'), Mapping):
        _check_train(c, opt['train'], train_keys, optimizers, schedulers, ours, _train_tasks(opt))
        if ours and net is not None:
            _check_frozen(c, opt['train'], net)
    elif is_train and 'train' in opt:
        c.section('train', opt['train'], REQUIRED_WHAT['train'])
    if isinstance(opt.get('logger'), Mapping):
        _check_logger(c, opt['logger'], is_train)
    elif 'logger' in opt:
        c.section('logger', opt['logger'], REQUIRED_WHAT['logger'])
    if opt.get('val') is not None and c.section('val', opt['val'], 'val_freq, save_img, metrics') is not None:
        srmodel = known_model and not ours
        _check_val(c, opt['val'], is_train, ours, srmodel)
    _check_strings(c, opt)
    c.raise_if_any()
