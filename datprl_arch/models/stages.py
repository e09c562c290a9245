"""Training stages (``train.stages``): one option file for MiO IR's sequential learning and TAP's two stages.

Each stage runs until ``until_iter`` (inclusive; the last may omit it: ``total_iter``) and may set

- ``tasks``: the training tasks it draws batches from (task names of the multi-domain dataset; default every
  task). Cumulative lists (``[derain]``, ``[derain, dehaze]``, ...) are MiO's sequential learning with replay;
- ``freeze``: parts frozen in this stage on top of ``train.freeze`` (``backbone``, ``prompts`` or name prefixes);
  ``[backbone]`` is TAP's prompt tuning of a pretrained restorer;
- ``lr``: the stage's base learning rate (``optim_g.lr`` otherwise; ``prompt_lr`` still applies to the prompts);
- ``reset_optimizer``: start the stage with a fresh optimizer and scheduler (MiO does between its stages).

Entering a stage that sets ``lr``, freezes differently or asks for ``reset_optimizer`` builds a new optimizer and
scheduler (a different set of trainable parameters needs one); the scheduler then counts from the stage's start.
The stage is a function of the iteration, so resuming lands in it: the training state's optimizer is that stage's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

STAGE_KEYS = ('until_iter', 'tasks', 'freeze', 'lr', 'reset_optimizer')


@dataclass(frozen=True)
class Stage:
    """One training stage: iterations ``first_iter..until_iter`` (1-based, as BasicSR counts)."""
    index: int
    first_iter: int
    until_iter: int
    tasks: Optional[tuple[str, ...]] = None
    freeze: tuple[str, ...] = ()
    lr: Optional[float] = None
    reset_optimizer: bool = False

    @property
    def new_optimizer(self) -> bool:
        """Whether entering this stage builds a new optimizer whatever the parameters (a changed frozen set also
        makes one: ``DATPRLModel._enter_stage``)."""
        return self.reset_optimizer or self.lr is not None

    def freezing(self, base: Sequence[str] = ()) -> str:
        """What the stage freezes, for messages (``base``: ``train.freeze``)."""
        also = f' with train.freeze {list(base)}' if base else ''
        return f'stage {self.index + 1} (iters {self.first_iter}-{self.until_iter}), freezing {list(self.freeze)}{also}'

    def describe(self, count: int) -> str:
        tasks = ', '.join(self.tasks) if self.tasks else 'all'
        frozen = ', '.join(self.freeze) if self.freeze else 'nothing more'
        return (f'stage {self.index + 1}/{count}, iters {self.first_iter}-{self.until_iter}: tasks [{tasks}]; '
                f'frozen: {frozen}')


def _names(value, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not value or \
            not all(isinstance(v, str) for v in value):
        raise ValueError(f'{where} must be a non-empty list of names, got {value!r}')
    return tuple(value)


def parse_stages(stages, total_iter: int) -> list[Stage]:
    """The validated stages of ``train.stages`` (empty without); every bad value names ``train.stages[i].key``."""
    if stages is None:
        return []
    if not isinstance(stages, list) or not stages:
        raise ValueError(f'train.stages must be a non-empty list of stages (until_iter, tasks, freeze, lr, '
                         f'reset_optimizer), got {stages!r}')
    parsed, first = [], 1
    for i, stage in enumerate(stages):
        where = f'train.stages[{i}]'
        if not isinstance(stage, dict):
            raise ValueError(f'{where} must be a mapping ({", ".join(STAGE_KEYS)}), got {stage!r}')
        unknown = [k for k in stage if k not in STAGE_KEYS]
        if unknown:
            raise ValueError(f"{where}: unknown key '{unknown[0]}' (accepted: {', '.join(STAGE_KEYS)})")
        last = i == len(stages) - 1
        until = stage.get('until_iter', total_iter if last else None)
        if isinstance(until, bool) or not isinstance(until, int) or until < first:
            raise ValueError(f'{where}.until_iter must be an integer >= {first} (stages run in order, each until '
                             f'its until_iter), got {until!r}')
        if last and until < total_iter:
            raise ValueError(f'{where}.until_iter is {until}, before train.total_iter {total_iter}: the last stage '
                             'must run to the end (omit its until_iter)')
        lr = stage.get('lr')
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0):
            raise ValueError(f'{where}.lr must be a positive number, got {lr!r}')
        reset = stage.get('reset_optimizer', False)
        if not isinstance(reset, bool):
            raise ValueError(f'{where}.reset_optimizer must be true or false, got {reset!r}')
        tasks = _names(stage['tasks'], f'{where}.tasks') if stage.get('tasks') is not None else None
        freeze = _names(stage['freeze'], f'{where}.freeze') if stage.get('freeze') is not None else ()
        parsed.append(Stage(i, first, until, tasks, freeze, None if lr is None else float(lr), reset))
        first = until + 1
    return parsed


def stage_at(stages: Sequence[Stage], current_iter: int) -> Optional[Stage]:
    """The stage iteration ``current_iter`` belongs to (the last one past its end; None without stages)."""
    if not stages:
        return None
    return next((s for s in stages if current_iter <= s.until_iter), stages[-1])
