"""One message for many problems: the collect-then-raise pattern of the dataset checks and the option schema."""
from __future__ import annotations

from typing import Sequence

#: How many problems a message lists before summarising the rest.
MAX_LISTED = 8


def problems_message(header: str, problems: Sequence[str], limit: int = MAX_LISTED) -> str:
    """``header`` followed by the first ``limit`` problems as a bulleted list and a count of the rest."""
    shown = '\n  - '.join(problems[:limit])
    more = len(problems) - limit
    return f'{header}\n  - {shown}' + (f'\n  ... and {more} more.' if more > 0 else '')
