"""One message for many problems: the collect-then-raise pattern of the dataset checks, the LMDB writer and the option
schema.

A check records every problem it finds (``Problems.add``) and raises them together at the end (``raise_if_any``), so
the user fixes them all in one round instead of one per run.
"""
from __future__ import annotations

from typing import Callable, Sequence

#: How many problems a message lists before summarising the rest.
MAX_LISTED = 8


def problems_message(header: str, problems: Sequence[str], limit: int = MAX_LISTED) -> str:
    """``header`` followed by the first ``limit`` problems as a bulleted list and a count of the rest."""
    shown = '\n  - '.join(problems[:limit])
    more = len(problems) - limit
    return f'{header}\n  - {shown}' + (f'\n  ... and {more} more.' if more > 0 else '')


class Problems:
    """Collects ``[where] message`` problems of one subject and raises them together as one ``error``.

    The message reads ``<subject>: <n> problem(s)<context>:`` followed by the list, e.g. ``subject="Dataset 'train'"``,
    ``context=' in the data or options'``.
    """

    def __init__(self, subject: str, error: Callable[[str], Exception], context: str = ''):
        self.subject, self.error, self.context = subject, error, context
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f'[{where}] {message}')

    def raise_if_any(self) -> None:
        if self.items:
            raise self.error(problems_message(f'{self.subject}: {len(self.items)} problem(s){self.context}:',
                                              self.items))
