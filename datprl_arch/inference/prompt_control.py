"""Choosing the prompt at inference: a task's own prompt (``--task NAME``) or a blend of two (``--blend A:B:ALPHA``).

- ``--task NAME``: networks whose prompt mode has one prompt per task (``ExplicitPrompt``, ``LowRankPrompt``)
  restore every image under task NAME's prompt instead of the one their task classifier picks.
- ``--blend A:B:ALPHA``: every image is restored under ``(1 - ALPHA) p_A + ALPHA p_B``. ``A`` and ``B`` are task
  names (modes with a prompt per task) or reference image files; for an image the prompt is the one the network
  composes from it: with DATPRL's dual pools, its domain-aware task prompt (the output of the composition, after
  both pools), with other modes the mode's prompt. ALPHA 0 is A's prompt exactly, 1 B's.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..data.image_io import ImageDecodeError, decode_raw, to_channels, to_unit


class PromptChoiceError(ValueError):
    """A ``--task`` or ``--blend`` that this network cannot follow; the message says why."""


def task_names(net) -> tuple[str, ...]:
    """The task names of the network's prompt mode (empty when it has no prompt per task)."""
    mode = getattr(net, 'prompt_mode', None)
    return mode.task_names if mode is not None else ()


def _prompt_kind(net) -> str:
    """What makes the network's prompt, for messages: its mode, its dual pools, or just its class."""
    if getattr(net, 'prompt_mode', None) is not None:
        return type(net.prompt_mode).__name__
    if getattr(net, 'prompt_width', None):
        return f'{type(net).__name__} with dual prompt pools'
    return type(net).__name__


def task_prompt(net, name: str) -> torch.Tensor:
    """The prompt ``[1, P]`` of task ``name`` of a prompt mode with a prompt per task."""
    tasks = task_names(net)
    if not tasks:
        raise PromptChoiceError(f'task {name!r}: {_prompt_kind(net)} has no prompt per task; task prompts need a '
                                'checkpoint trained with prompt type ExplicitPrompt or LowRankPrompt (a blend of two '
                                'reference images works with every prompted network)')
    if name not in tasks:
        raise PromptChoiceError(f'task {name!r} is not a task of this checkpoint (its tasks: {list(tasks)})')
    with torch.no_grad():
        return net.prompt_mode.task_prompt(tasks.index(name)).detach()


def parse_blend(text: str) -> tuple[str, str, float]:
    """``'A:B:ALPHA'`` -> ``(A, B, alpha)`` with alpha in [0, 1]."""
    parts = text.rsplit(':', 2)
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise PromptChoiceError(f'--blend expects A:B:ALPHA (two task names or image files and a weight), got '
                                f'{text!r}')
    try:
        alpha = float(parts[2])
    except ValueError:
        raise PromptChoiceError(f'--blend {text!r}: ALPHA must be a number in [0, 1], got {parts[2]!r}') from None
    if not 0 <= alpha <= 1:
        raise PromptChoiceError(f'--blend {text!r}: ALPHA must lie in [0, 1], got {alpha}')
    return parts[0], parts[1], alpha


def reference_prompt(restorer, reference: str) -> torch.Tensor:
    """The prompt ``[1, P]`` of ``reference``: a task name of the network, else an image file it composes one from."""
    if reference in task_names(restorer.net):
        return task_prompt(restorer.net, reference).to(restorer.device)
    if not os.path.isfile(reference):
        tasks = task_names(restorer.net)
        if tasks:
            raise PromptChoiceError(f'--blend: {reference!r} is neither a task of this checkpoint ({list(tasks)}) nor '
                                    'an image file')
        raise PromptChoiceError(f'--blend: {reference!r} is neither an image file nor a task name of this checkpoint: '
                                f'{_prompt_kind(restorer.net)} has no prompt per task, so A and B must be reference '
                                'image files (task names need a checkpoint trained with prompt type ExplicitPrompt or '
                                'LowRankPrompt)')
    from basicsr.utils import img2tensor
    try:
        with open(reference, 'rb') as f:
            raw, _ = decode_raw(f.read(), where=reference)
    except (OSError, ImageDecodeError) as err:
        raise PromptChoiceError(f'--blend: cannot read the reference image {reference} ({err})') from None
    x = img2tensor(to_channels(to_unit(raw), restorer.channels), bgr2rgb=True, float32=True)[None]
    with torch.inference_mode():
        return restorer.image_prompt(x).float()


def chosen_prompt(restorer, task: Optional[str] = None, blend: Optional[str] = None) -> Optional[torch.Tensor]:
    """The fixed prompt ``[1, P]`` of ``--task`` or ``--blend`` (None: each image composes its own)."""
    if task is not None and blend is not None:
        raise PromptChoiceError('--task and --blend exclude each other')
    if task is None and blend is None:
        return None
    if not restorer.prompted:
        raise PromptChoiceError(f'{type(restorer.net).__name__} has no prompt to choose (a prompt-free network)')
    if task is not None:
        return task_prompt(restorer.net, task).to(restorer.device)
    first, second, alpha = parse_blend(blend)
    return torch.lerp(reference_prompt(restorer, first), reference_prompt(restorer, second), alpha)
