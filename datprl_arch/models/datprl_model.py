"""The DATPRL training and evaluation model for BasicSR's runners.

Registered as ``DATPRLModel`` and under the official names ``ALLINONEModel`` and ``MultiModalSRv3Model`` (the model
the official 6-task option file names but the release lacks). It is BasicSR's SRModel plus:

- every key of the official ``train:`` section (see ``TRAIN_KEYS``); an unknown key is an error listing them;
- checkpoint loading for BasicSR, Lightning, plain and safetensors files; ``path.pretrain_network_backbone`` (and
  ``param_key_backbone``) loads a plain backbone checkpoint into a ``PromptedBackbone`` (strict for the backbone's
  keys, fresh prompts) before ``pretrain_network_g``, which still loads the whole network;
- parameter groups (``prompt_lr``), the common optimizers and schedulers, freezing named parts, ``use_amp``
  (bf16/fp16 autocast on CUDA, bf16 on CPUs with native bf16, else fp32 with a notice), ``grad_clip``, opt-in
  ``compile``;
- EMA that also carries buffers;
- atomic checkpoints and training states; a non-finite loss or gradient skips its step (nothing of it reaches the
  weights, the EMA or the usage counts), several in a row stop training;
- validation that reports every set, the average over all sets and per domain, into the log and a JSON file.

One training step: ``feed_data`` (images, labels, GT paths) -> forward under autocast -> pixel, FFT and
prompt-pool losses (``PromptObjectives``, reading ``net.prompt_state``) -> backward (scaled for fp16) -> finite
check -> clip -> optimizer step -> EMA -> usage statistics. The step reads one value back from the GPU (the finite
flag; fp16's GradScaler adds its own); logged losses stay on the device until BasicSR's logger asks for them.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext
from os import path as osp

import torch
from torch import distributed as dist

from basicsr.losses import build_loss
from basicsr.metrics import calculate_metric
from basicsr.models.base_model import BaseModel
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger, tensor2img
from basicsr.utils.dist_util import master_only
from basicsr.utils.registry import MODEL_REGISTRY

from ..archs.prompt import dead_parameter_names
from ..archs.prompt.modes.mio import ExplicitPrompt
from ..data.multidomain_dataset import training_set
from ..errors import DatprlError
from ..evaluation.metrics import metric_bits_note, parse_metric_bits, score
from ..inference.whole_image import bounded_forward
from ..losses.pixel_weighting import DEFAULT_FLOOR, PIXEL_WEIGHTINGS, error_weights
from ..options import OptionFileError
from ..utils.atomic import atomic_torch_save
from ..utils.checkpoint import NETWORK_KEY, STAGES_KEY, load_checkpoint, plain_options
from ..utils.network_probe import output_problem, probe_channels
from ..utils.precision import AMP_DTYPES, amp_problem, autocast, memory_format, use_tf32
from ..utils.registry import register
from .analysis import PromptAnalysis
from .optim import build_optimizer, build_scheduler, check_trainable, parameter_groups, resolve_parts
from .prompt_objectives import OBJECTIVE_KEYS, PromptObjectives
from .reporting import SetScores, ValidationReport, source_lines, write_result_image
from .stages import Stage, parse_stages, stage_at

BACKBONE_PATH_KEY = 'pretrain_network_backbone'
BASICSR_TRAIN_KEYS = ('ema_decay', 'optim_g', 'scheduler', 'total_iter', 'warmup_iter', 'pixel_opt', 'perceptual_opt')
MODEL_TRAIN_KEYS = ('fft_opt', 'prompt_lr', 'use_amp', 'amp_dtype', 'tf32', 'grad_clip', 'freeze', 'compile',
                    'max_nonfinite_steps', 'enable_prompt_analysis', 'prompt_analysis_freq',
                    'prompt_analysis_save_path', 'pixel_weighting', 'pixel_weight_floor',
                    'pixel_weight_power', 'stages')
TRAIN_KEYS = BASICSR_TRAIN_KEYS + MODEL_TRAIN_KEYS + OBJECTIVE_KEYS
DEFAULT_MAX_NONFINITE = 5  # consecutive non-finite steps tolerated before training stops


class NonFiniteLossError(DatprlError, RuntimeError):
    """Training stopped after ``max_nonfinite_steps`` non-finite losses in a row (the message says what to change)."""


def check_train_keys(train_opt: dict) -> None:
    unknown = sorted(set(train_opt) - set(TRAIN_KEYS))
    if unknown:
        raise ValueError(f'unknown key(s) {unknown} in the train: section; accepted keys: {sorted(TRAIN_KEYS)}')


@register(MODEL_REGISTRY, aliases=('ALLINONEModel', 'MultiModalSRv3Model'))
class DATPRLModel(SRModel):
    """SRModel with the DATPRL training method; see the module docstring."""

    # ---------------------------------------------------------------- setup
    def __init__(self, opt):
        #: ``val.metric_bits``: ``native`` (default; 16-bit sets at their stored depth) or ``8`` (BasicSR's
        #: 8-bit figures); checked before the network is built so a typo does not surface at the first validation.
        self.metric_bits = parse_metric_bits((opt.get('val') or {}).get('metric_bits'), 'val.metric_bits')
        self._metric_bits_logged = False
        #: ``val.max_pixels``: images above it are tested in tiles under their whole-image prompt (None: whole).
        self.max_pixels = (opt.get('val') or {}).get('max_pixels')
        self._tiling_logged = False
        super().__init__(opt)
        if self.device.type == 'cpu':
            get_root_logger().info(f'CPU threads: {torch.get_num_threads()} (--threads N sets them).')

    def model_to_device(self, net):
        """Freeze what ``train.freeze`` names and the dead parameters, and put the network in the device's memory
        format, before any DDP wrapping sees the network.

        ``num_gpu`` > 1 without a launcher (``num_gpu: auto`` on a multi-GPU machine) would wrap a prompted network
        in DataParallel: refused for training, whose steps run through the wrapper; testing never does (``test``
        runs the bare network), so it runs on one GPU with a warning."""
        if self.opt['num_gpu'] > 1 and not self.opt['dist'] and hasattr(net, 'prompt_members'):
            if self.opt['is_train']:
                raise ValueError(f"num_gpu: {self.opt['num_gpu']} without a launcher would use DataParallel, whose "
                                 'replicas lose the prompt retrieval the prompt-pool losses read; train on several '
                                 'GPUs with torchrun ... --launcher pytorch (README, "Multi-GPU and multi-node"), or '
                                 'on one with num_gpu: 1 (or CUDA_VISIBLE_DEVICES=0)')
            get_root_logger().warning(f"num_gpu: {self.opt['num_gpu']} without a launcher: testing on one GPU "
                                      f'({self.device}); several GPUs need torchrun.')
            self.opt['num_gpu'] = 1
        self._load_backbone(net)
        #: Layout of the networks and their inputs: channels_last on the CPU (oneDNN's), set before DDP builds its
        #: gradient buckets from the parameters.
        self.memory_format = memory_format(self.device)
        net.to(memory_format=self.memory_format)
        if self.memory_format != torch.contiguous_format:
            get_root_logger().info(f'{type(net).__name__} and its inputs in the channels_last memory format.')
        if self.opt['is_train'] and self.opt.get('train'):
            parts = self.opt['train'].get('freeze') or ()
            frozen = dead_parameter_names(net) | resolve_parts(net, parts)
            check_trainable(net, frozen, 'train.freeze', f'freezing {list(parts)}')
            self._base_frozen = frozen  # what every training stage freezes
            for name, param in net.named_parameters():
                if name in frozen:
                    param.requires_grad_(False)
            if frozen:
                get_root_logger().info(f'Frozen parameters: {len(frozen)} tensors, '
                                       f'{sum(p.numel() for n, p in net.named_parameters() if n in frozen):,} values')
        return super().model_to_device(net)

    def _load_backbone(self, net) -> None:
        """``path.pretrain_network_backbone``: a plain backbone checkpoint into the wrapped network's backbone."""
        path = (self.opt.get('path') or {}).get(BACKBONE_PATH_KEY)
        if path is None:
            return
        if not hasattr(net, 'load_backbone'):
            raise ValueError(f'path.{BACKBONE_PATH_KEY} loads a backbone into a PromptedBackbone; network_g is a '
                             f'{type(net).__name__}: use path.pretrain_network_g')
        get_root_logger().info(f'Loading the backbone of {type(net).__name__} from {path}')
        net.load_backbone(path, self.opt['path'].get('param_key_backbone'))

    def init_training_settings(self):
        train_opt = self.opt['train']
        check_train_keys(train_opt)
        self.stages = parse_stages(train_opt.get('stages'), int(train_opt['total_iter']))
        self.stage: Stage | None = None
        if any(stage.tasks for stage in self.stages) and training_set() is None:
            raise ValueError('train.stages with tasks needs the multi-domain dataset (type: DATPRLMultiDomainDataset) '
                             'as the training set')
        self.objectives = PromptObjectives(train_opt, self.opt, self.get_bare_model(self.net_g)).to(self.device)
        if self.opt['dist']:  # the alignment head lives outside DDP: start every rank from rank 0's values
            for param in self.objectives.parameters():
                dist.broadcast(param.data, src=0)
        self.cri_fft = build_loss(dict(train_opt['fft_opt'])).to(self.device) if train_opt.get('fft_opt') else None
        self.grad_clip = train_opt.get('grad_clip')
        self.pixel_weighting = train_opt.get('pixel_weighting') or 'none'
        if self.pixel_weighting not in PIXEL_WEIGHTINGS:  # the option check names it first (options_schema)
            raise OptionFileError(f'train.pixel_weighting must be one of {PIXEL_WEIGHTINGS}, got '
                                  f'{self.pixel_weighting!r}')
        self.pixel_weight_floor = float(train_opt.get('pixel_weight_floor', DEFAULT_FLOOR))
        self.pixel_weight_power = float(train_opt.get('pixel_weight_power', 1.0))
        self.max_nonfinite = int(train_opt.get('max_nonfinite_steps', DEFAULT_MAX_NONFINITE))
        self.nonfinite_steps = 0
        self.amp_dtype = self._amp_dtype(train_opt)
        if train_opt.get('tf32'):
            get_root_logger().info(use_tf32(self.device))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        super().init_training_settings()  # EMA, pixel/perceptual losses, optimizers, schedulers
        if hasattr(self, 'net_g_ema'):
            self.net_g_ema.to(memory_format=self.memory_format)
        if self.stages:
            self._log_stage_plan()
            if not self.opt['path'].get('resume_state'):  # resume_training enters the saved stage
                self._enter_stage(stage_at(self.stages, 1))
        self.compiled = bool(train_opt.get('compile'))
        if self.compiled:  # static shapes: Inductor's dynamic-shape lowering fails on the Restormer (restormer_arch)
            self.get_bare_model(self.net_g).compile(dynamic=False)

    def _amp_dtype(self, train_opt: dict) -> torch.dtype | None:
        """The autocast dtype of ``use_amp``/``amp_dtype`` (None: float32): bf16/fp16 on CUDA, bf16 on CPUs with
        native bf16 (:mod:`datprl_arch.utils.precision`). Where the device cannot run it fast, the log says why:
        training then runs in float32 on the CPU (an option file works on every machine), and in the requested
        dtype on a GPU that emulates bf16."""
        if not train_opt.get('use_amp'):
            return None
        amp_dtype = train_opt.get('amp_dtype', 'bf16')
        if amp_dtype not in AMP_DTYPES:
            raise ValueError(f"train.amp_dtype must be one of {sorted(AMP_DTYPES)}, got '{amp_dtype}'")
        logger = get_root_logger()
        problem = amp_problem(self.device, amp_dtype)
        if problem and self.device.type != 'cuda':
            logger.info(f'use_amp ({amp_dtype}): {problem}; training in float32.')
            return None
        if problem:
            logger.warning(f'use_amp ({amp_dtype}): {problem}.')
        else:
            logger.info(f'use_amp: autocast in {amp_dtype} on {self.device.type}.')
        return AMP_DTYPES[amp_dtype]

    def setup_optimizers(self):
        train_opt = self.opt['train']
        stage = getattr(self, 'stage', None)
        lr = stage.lr if stage is not None and stage.lr is not None else train_opt['optim_g']['lr']
        groups = parameter_groups(self.get_bare_model(self.net_g), lr, train_opt.get('prompt_lr'))
        extra = [p for p in self.objectives.parameters() if p.requires_grad]
        if extra:
            groups.append({'params': extra, 'lr': train_opt.get('prompt_lr') or lr, 'name': 'alignment'})
        self.optimizer_g = build_optimizer({**train_opt['optim_g'], 'lr': lr}, groups)
        self.optimizers.append(self.optimizer_g)

    def setup_schedulers(self):
        for optimizer in self.optimizers:
            self.schedulers.append(build_scheduler(self.opt['train']['scheduler'], optimizer))

    def load_network(self, net, load_path, strict=True, param_key='params'):
        """Load ``load_path`` into ``net``; ``param_key`` is preferred when the file has it, else the format decides."""
        get_root_logger().info(f'Loading {type(self.get_bare_model(net)).__name__} from {load_path}')
        load_checkpoint(net, load_path, param_key=param_key, strict=strict)

    # ---------------------------------------------------------------- training stages
    def _frozen_in(self, stage: Stage) -> set[str]:
        return self._base_frozen | resolve_parts(self.get_bare_model(self.net_g), stage.freeze,
                                                 f'train.stages[{stage.index}].freeze')

    def _log_stage_plan(self) -> None:
        """Every stage and its trainable parameter count, once at the start (also saved in checkpoints)."""
        net = self.get_bare_model(self.net_g)
        self.stage_plan = []
        for stage in self.stages:
            frozen = self._frozen_in(stage)
            check_trainable(net, frozen, f'train.stages[{stage.index}].freeze',
                            stage.freezing(self.opt['train'].get('freeze') or ()))
            trainable = sum(p.numel() for n, p in net.named_parameters() if n not in frozen)
            self.stage_plan.append({'stage': stage.index + 1, 'first_iter': stage.first_iter,
                                    'until_iter': stage.until_iter, 'tasks': list(stage.tasks or ()),
                                    'freeze': list(stage.freeze), 'trainable_params': trainable})
            get_root_logger().info(f'Training {stage.describe(len(self.stages))}; trainable parameters {trainable:,}')

    def _enter_stage(self, stage: Stage, resumed: bool = False) -> None:
        """Switch to ``stage``: the training set's tasks, the frozen parameters, and a new optimizer and scheduler
        where the stage needs one (``models.stages``)."""
        self.stage = stage
        dataset = training_set()
        if dataset is not None:
            dataset.set_stage_tasks(stage.tasks)
        net = self.get_bare_model(self.net_g)
        frozen = self._frozen_in(stage)
        changed = False
        for name, param in net.named_parameters():
            if param.requires_grad != (name not in frozen):
                param.requires_grad_(name not in frozen)
                changed = True
        if changed and self.opt['dist']:  # DDP fixes its parameter set when it wraps the network
            self.net_g = BaseModel.model_to_device(self, net)
        if stage.new_optimizer or changed or resumed:
            self.optimizers, self.schedulers = [], []
            self.setup_optimizers()
            self.setup_schedulers()
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        what = 'resuming in' if resumed else 'entering'
        fresh = '; new optimizer and scheduler' if stage.new_optimizer or changed else ''
        get_root_logger().info(f'Training: {what} {stage.describe(len(self.stages))}{fresh}; trainable '
                               f'parameters {trainable:,}')

    def _update_stage(self, current_iter: int) -> None:
        stage = stage_at(self.stages, current_iter)
        if stage is not None and stage is not self.stage:
            self._enter_stage(stage)

    # ---------------------------------------------------------------- training step
    def feed_data(self, data):
        super().feed_data(data)
        self.lq = self.lq.contiguous(memory_format=self.memory_format)
        self.labels = {k: data[k].to(self.device) for k in ('source', 'domain', 'task') if k in data}
        self.gt_paths = list(data.get('gt_path', ()))
        self.task_names = list(data['task_name']) if 'task_name' in data else None
        self.source_names = list(data['source_name']) if 'source_name' in data else None

    def _autocast(self):
        return autocast(self.device, self.amp_dtype)

    def _task_labels(self):
        """The batch's task labels for a prompt mode with a prompt per task (``PromptedBackbone.task_labels``)."""
        net = self.get_bare_model(self.net_g)
        return net.task_labels(self.task_names) if hasattr(net, 'task_labels') else nullcontext()

    def _losses(self) -> 'OrderedDict[str, torch.Tensor]':
        losses = OrderedDict()
        output = self.output.float()
        if self.cri_pix:
            reference = {'input_error': self.lq, 'output_error': output}.get(self.pixel_weighting)
            weight = None if reference is None else error_weights(
                reference, self.gt, self.pixel_weight_floor, self.pixel_weight_power)
            losses['l_pix'] = self.cri_pix(output, self.gt, weight=weight)
        if self.cri_perceptual:
            percep, style = self.cri_perceptual(output, self.gt)
            for name, value in (('l_percep', percep), ('l_style', style)):
                if value is not None:
                    losses[name] = value
        if self.cri_fft:
            losses['l_fft'] = self.cri_fft(output, self.gt)
        losses.update(self.objectives(self.get_bare_model(self.net_g), self.labels, self.gt_paths, self.source_names))
        return losses

    def _all_finite(self, losses) -> torch.Tensor:
        """0-d bool tensor on the device: every loss term is finite on every rank (ranks must agree, or DDP would
        hang). Nothing is read back here; the all-reduce is a device collective."""
        finite = torch.stack([torch.isfinite(v).all() for v in losses.values()]).all().float()
        if self.opt['dist']:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return finite > 0

    def optimize_parameters(self, current_iter):
        """One training step (module docstring). A step with a non-finite loss (on any rank) or, without the fp16
        scaler, a non-finite gradient is skipped before clipping, the optimizer and EMA, and its prompt selections
        are not counted."""
        self._update_stage(current_iter)
        self.optimizer_g.zero_grad(set_to_none=True)
        with self._autocast(), self._task_labels():
            self.output = self.net_g(self.lq)
            losses = self._losses()
        finite = self._all_finite(losses)
        if self.scaler.is_enabled():  # fp16: decide before backward, so a forward overflow leaves the scale alone
            stepped = bool(finite.item()) and self._scaled_step(losses)
        else:
            stepped = self._checked_step(losses, finite)
        if stepped:
            self.nonfinite_steps = 0
            if self.ema_decay > 0:
                self.model_ema(decay=self.ema_decay)
        else:
            self._skip_step(losses, current_iter)
        self.log_dict = self.reduce_loss_dict(OrderedDict((k, v.detach()) for k, v in losses.items()))
        self.log_dict.update(self.objectives.end_step(self.get_bare_model(self.net_g), current_iter, self.optimizer_g,
                                                      counted=stepped))

    def _optimized_parameters(self) -> list:
        return [p for group in self.optimizer_g.param_groups for p in group['params']]

    def _scaled_step(self, losses) -> bool:
        """fp16 with GradScaler: backward of the scaled loss, unscale, clip, step; the scaler itself skips the
        optimizer step (and lowers the scale) when the gradients overflow."""
        self.scaler.scale(sum(losses.values())).backward()
        self._average_objective_gradients()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer_g)
            torch.nn.utils.clip_grad_norm_(self._optimized_parameters(), self.grad_clip)
        self.scaler.step(self.optimizer_g)
        self.scaler.update()
        return True

    def _checked_step(self, losses, finite: torch.Tensor) -> bool:
        """bf16 and fp32 (no scaler): backward (also of a non-finite loss: it frees the graph), then one read-back
        decides on the losses and the gradient norm together; only a finite step is clipped and taken. The norm is
        of DDP's averaged gradients, so every rank decides alike."""
        sum(losses.values()).backward()
        self._average_objective_gradients()
        params = self._optimized_parameters()
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if not bool((finite & torch.isfinite(norm)).item()):
            self.optimizer_g.zero_grad(set_to_none=True)
            return False
        if self.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)
        self.optimizer_g.step()
        return True

    def reduce_loss_dict(self, loss_dict):
        """BasicSR's average of the logged losses over the ranks (on rank 0), kept as 0-d tensors on the device:
        BasicSR reads every term back every step, but logs only every ``print_freq`` (``get_current_log``)."""
        with torch.no_grad():
            names = list(loss_dict)
            if not names:
                return OrderedDict()
            values = torch.stack([v.float().mean() for v in loss_dict.values()])
            if self.opt['dist']:
                dist.reduce(values, dst=0)
                if self.opt['rank'] == 0:
                    values /= self.opt['world_size']
            return OrderedDict(zip(names, values.unbind()))

    def get_current_log(self):
        """The last step's logged values as floats, read back from the device at once."""
        names = [k for k, v in self.log_dict.items() if torch.is_tensor(v)]
        floats = dict(zip(names, torch.stack([self.log_dict[k] for k in names]).tolist())) if names else {}
        return OrderedDict((k, floats.get(k, v)) for k, v in self.log_dict.items())

    def _average_objective_gradients(self) -> None:
        """DDP averages the network's gradients; the model-owned alignment head needs the same by hand."""
        if not self.opt['dist']:
            return
        for param in self.objectives.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= self.opt['world_size']

    def test(self):
        """Restore ``self.lq`` ``[B, C, H, W]`` with the EMA network if any, else the bare network (never through the
        DDP wrapper, since only rank 0 validates); an image above ``val.max_pixels`` in tiles under its whole-image
        prompt, as the restore command does (:mod:`~datprl_arch.inference.whole_image`)."""
        net = self._tested_net()
        was_training = net.training
        net.eval()
        with torch.no_grad(), self._eager(), self._validation_labels(net):
            self.output, side = bounded_forward(net, self.lq, self.max_pixels)
        net.train(was_training)
        if side is not None and not self._tiling_logged:
            get_root_logger().info(f'Images above val.max_pixels ({self.max_pixels}) are tested in tiles of {side} '
                                   'pixels under the prompt of the whole image.')
            self._tiling_logged = True

    def _validation_labels(self, net):
        """Validation in training of a prompt mode that cannot choose its prompt blind (``ExplicitPrompt`` with
        ``classifier_weight: 0``: its classifier never trained) runs under the batch's task labels, as the benchmark's
        ``--task-prompts`` does; everything else (and testing, which refuses such a checkpoint blind) unchanged."""
        mode = getattr(net, 'prompt_mode', None)
        blind = isinstance(mode, ExplicitPrompt) and not mode.classifier_weight
        if not (self.opt['is_train'] and blind and getattr(self, 'task_names', None)):
            return nullcontext()
        if not getattr(self, '_labels_logged', False):
            get_root_logger().info(f'{type(mode).__name__} with classifier_weight: 0 validates under the task labels '
                                   'of the validation sets (its classifier is untrained).')
            self._labels_logged = True
        return net.task_labels(self.task_names)

    def _eager(self):
        """With ``train.compile`` the bare network validates uncompiled (as the EMA network does): static-shape
        graphs would otherwise be compiled again for every validation image size."""
        return torch.compiler.set_stance('force_eager') if getattr(self, 'compiled', False) else nullcontext()

    def _skip_step(self, losses, current_iter):
        """Count a skipped step (stop after ``max_nonfinite_steps`` in a row) and drop its autograd graph: kept in
        ``self.output`` and ``net.prompt_state``, its activations would live on through the next forward."""
        self.output = self.output.detach()
        net = self.get_bare_model(self.net_g)
        if getattr(net, 'prompt_state', None) is not None:
            net.prompt_state = None
        self.nonfinite_steps += 1
        bad = [k for k, v in losses.items() if not torch.isfinite(v).all()]
        what = f'non-finite loss {bad}' if bad else 'non-finite gradient (or loss on another rank)'
        get_root_logger().warning(f'iter {current_iter}: {what}; step skipped '
                                  f'({self.nonfinite_steps} in a row, limit {self.max_nonfinite})')
        if self.nonfinite_steps >= self.max_nonfinite:
            raise NonFiniteLossError(f'{self.nonfinite_steps} consecutive non-finite steps (last: {what}) at iter '
                                     f'{current_iter}; stopping before NaN weights are written. Lower the learning '
                                     'rate, set grad_clip, or check the data.')

    def model_ema(self, decay=0.999):
        """EMA of the parameters, ``ema += (1 - decay) * (param - ema)`` in one multi-tensor kernel per device and
        dtype (a loop would launch two kernels per tensor); buffers are copied (BasicSR's EMA leaves them at their
        initial values)."""
        net = self.get_bare_model(self.net_g)
        ema_params = dict(self.net_g_ema.named_parameters())
        with torch.no_grad():
            pairs = [(ema_params[name], param) for name, param in net.named_parameters()]
            if pairs:
                torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1 - decay)
            ema_buffers = dict(self.net_g_ema.named_buffers())
            for name, buf in net.named_buffers():
                ema_buffers[name].copy_(buf)

    # ---------------------------------------------------------------- saving and resuming
    def save(self, epoch, current_iter):
        """BasicSR's save (networks, then training state), skipped with a warning when it would write a poisoned
        checkpoint: the last step's losses were non-finite, a weight or EMA value is non-finite, or the network or
        its EMA gives a non-finite output on the small probe input (finite weights that restore nothing). The previous
        checkpoint then stays the newest one resume finds.

        First, on every rank (a collective), the prompt-usage counts of all ranks are collected on rank 0, so its
        training state holds the whole window's and a resumed run counts them once."""
        self.objectives.consolidate_stats()
        why = self._unsafe_to_save()
        if why:
            what = ('the final checkpoint' if current_iter == -1 else
                    f'the checkpoint and training state of iter {current_iter}')
            get_root_logger().warning(f'Not saving {what}: {why}. The last saved checkpoint stays the newest.')
            return
        super().save(epoch, current_iter)

    def _unsafe_to_save(self) -> str | None:
        """Why the current weights must not be saved, or None: a non-finite last step, a non-finite weight, or a
        network (or its EMA) whose output on the probe input is not finite (finite weights blown up by a step whose
        loss was still finite: :mod:`~datprl_arch.utils.network_probe`)."""
        if getattr(self, 'nonfinite_steps', 0):
            return f'the last {self.nonfinite_steps} training step(s) had non-finite losses'
        for label in ('net_g', 'net_g_ema'):
            if not hasattr(self, label):
                continue
            net = self.get_bare_model(getattr(self, label))
            bad = [name for name, value in net.state_dict().items()
                   if value.is_floating_point() and not torch.isfinite(value).all()]
            if bad:
                return f'{label} holds non-finite values in {len(bad)} tensor(s), e.g. {bad[:3]}'
            with self._eager():
                problem = output_problem(net, probe_channels(self.opt.get('network_g')))
            if problem:
                return f'{label} restores nothing: {problem}'
        return None

    @master_only
    def save_network(self, net, net_label, current_iter, param_key='params'):
        """BasicSR's ``net_<label>_<iter>.pth`` ``{param_key: state_dict}`` plus the network's options under
        :data:`~datprl_arch.utils.checkpoint.NETWORK_KEY` (rebuildable without the option file), written atomically.
        Tensors are stored contiguous whatever layout the run used (channels_last on the CPU), as other tools expect
        (safetensors refuses strided tensors)."""
        nets = net if isinstance(net, list) else [net]
        keys = param_key if isinstance(param_key, list) else [param_key]
        state = {key: {k: v.cpu().contiguous() for k, v in self.get_bare_model(n).state_dict().items()}
                 for n, key in zip(nets, keys)}
        network_opt = self.opt.get(net_label.replace('net_', 'network_', 1))  # net_g -> network_g
        if network_opt:
            state[NETWORK_KEY] = plain_options(network_opt)
        if getattr(self, 'stage_plan', None):
            state[STAGES_KEY] = self.stage_plan
        name = 'latest' if current_iter == -1 else current_iter
        atomic_torch_save(state, osp.join(self.opt['path']['models'], f'{net_label}_{name}.pth'))

    @master_only
    def save_training_state(self, epoch, current_iter):
        """BasicSR's ``<iter>.state`` plus AMP scaler, prompt statistics and alignment head, written atomically."""
        if current_iter == -1:
            return
        state = {'epoch': epoch, 'iter': current_iter,
                 'optimizers': [o.state_dict() for o in self.optimizers],
                 'schedulers': [s.state_dict() for s in self.schedulers],
                 'scaler': self.scaler.state_dict(), 'objectives': self.objectives.state_dict(),
                 'objective_stats': self.objectives.stats_state()}
        atomic_torch_save(state, osp.join(self.opt['path']['training_states'], f'{current_iter}.state'))

    def resume_training(self, resume_state):
        if self.stages:  # the saved optimizer is that of the stage the saving run was in
            self._enter_stage(stage_at(self.stages, int(resume_state['iter'])), resumed=True)
        super().resume_training(resume_state)
        if resume_state.get('scaler'):  # empty when the saving run had no fp16 scaling
            self.scaler.load_state_dict(resume_state['scaler'])
        if 'objectives' in resume_state:
            self.objectives.load_state_dict(resume_state['objectives'])
            self.objectives.load_stats_state(resume_state['objective_stats'])

    # ---------------------------------------------------------------- validation
    def _report(self) -> ValidationReport:
        if not hasattr(self, 'report'):
            phases = [d.get('phase') for d in self.opt['datasets'].values()]
            count = sum(p == 'val' for p in phases) if self.opt['is_train'] else len(phases)
            root = self.opt['path']['experiments_root' if self.opt['is_train'] else 'results_root']
            resumed = bool(self.opt['is_train'] and self.opt['path'].get('resume_state'))
            self.report = ValidationReport(count, osp.join(root, 'metrics.json'), resume=resumed)
        return self.report

    def _analysis_for(self, current_iter) -> PromptAnalysis | None:
        """The prompt analysis collecting in this validation round, if one is due: in training every
        ``prompt_analysis_freq`` iterations with ``enable_prompt_analysis``; in testing with ``val.prompt_analysis``."""
        if self.opt['is_train']:
            train_opt = self.opt['train']
            freq = int(train_opt.get('prompt_analysis_freq') or self.opt['val']['val_freq'])
            if not train_opt.get('enable_prompt_analysis') or int(current_iter) % freq:
                return None
            path = train_opt.get('prompt_analysis_save_path')
        elif self.opt['val'].get('prompt_analysis'):
            path = self.opt['val'].get('prompt_analysis_save_path')
        else:
            return None
        if not hasattr(self, 'analysis'):
            root = self.opt['path']['experiments_root' if self.opt['is_train'] else 'results_root']
            self.analysis = PromptAnalysis(path or osp.join(root, 'prompt_analysis'))
        return self.analysis

    def _tested_net(self):
        return self.net_g_ema if hasattr(self, 'net_g_ema') else self.get_bare_model(self.net_g)

    def _log_metric_bits(self) -> None:
        """State ``val.metric_bits`` in the log, once (at the first validation with metrics)."""
        if self.opt['val'].get('metrics') and not self._metric_bits_logged:
            get_root_logger().info(f'Validation metrics (val.metric_bits: {self.metric_bits}): '
                                   f'{metric_bits_note(self.metric_bits)}')
            self._metric_bits_logged = True

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        """Metrics of one validation/test set; after the last set of a round, averages over all sets and per
        domain (and the prompt analysis, when due). 16-bit sets are scored at their native depth unless
        ``val.metric_bits: 8``; an image whose metric is not finite (SSIM under 11 px) is left out of that
        metric's mean, with a warning. A set of several sources is reported per source, each under its own domain
        and task (:class:`~.reporting.SetScores`). Images are written under ``visualization/<set>/`` in the input's
        bit depth and channels."""
        if self.opt['is_train']:  # BasicSR's loop ends past total_iter (one step per remaining epoch): the
            current_iter = min(current_iter, self.opt['train']['total_iter'])  # final validation is of total_iter
        dataset_name = dataloader.dataset.opt['name']
        metric_opts = self.opt['val'].get('metrics') or {}
        self._log_metric_bits()
        scores = SetScores(dataset_name, dataloader.dataset.opt)  # per source: a set may mix domains and tasks
        analysis = self._analysis_for(current_iter)
        for val_data in dataloader:
            self.feed_data(val_data)
            self.test()
            label = scores.label(val_data)
            if analysis is not None and getattr(self._tested_net(), 'prompt_state', None) is not None:
                analysis.collect(self._tested_net().prompt_state,
                                 {'task': label.task, 'domain': label.domain, 'source': dataset_name})
            result = self.output.detach().cpu()
            img_name = osp.splitext(osp.basename(val_data['lq_path'][0]))[0]
            if hasattr(self, 'gt'):
                bit_depth = int(val_data['bit_depth'][0]) if 'bit_depth' in val_data else 8
                values = score(result, self.gt.detach().cpu(), metric_opts, bit_depth, self.metric_bits,
                               f'[{dataset_name}] {img_name}')
                del self.gt
            else:  # no-reference metrics (e.g. NIQE) on BasicSR's 8-bit image
                values = {name: calculate_metric({'img': tensor2img([result])}, dict(opt_))
                          for name, opt_ in metric_opts.items()}
            scores.add(label, values)
            if save_img:
                tag = self.opt['val'].get('suffix') or (current_iter if self.opt['is_train'] else self.opt['name'])
                path = osp.join(self.opt['path']['visualization'], dataset_name, f'{img_name}_{tag}.png')
                write_result_image(path, result[0], val_data)
            del self.lq, self.output
        self.metric_results = scores.means()
        logger = get_root_logger()
        if metric_opts:
            self._initialize_best_metric_results(dataset_name)
            for name, value in self.metric_results.items():
                self._update_best_metric_result(dataset_name, name, value, current_iter)
            self._log_validation_metric_values(current_iter, dataset_name, tb_logger)
            for line in source_lines(scores):
                logger.info(line)
        summary = self._report().add_set(current_iter, dataset_name, scores.entries())
        if summary is None:
            return
        if metric_opts:
            logger.info(summary)
            if tb_logger:
                for name, value in self.report.last_average.items():
                    tb_logger.add_scalar(f'metrics/average/{name}', value, current_iter)
        if analysis is not None and analysis.records:
            logger.info(f'Prompt analysis written to {analysis.write(current_iter, self._tested_net())}')
