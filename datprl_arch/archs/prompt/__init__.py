"""The backbone-independent prompt system: pools, queries, composition and gated fusion."""
from .compose import SingleKeyAttention
from .fusion import PromptedBlock, dead_parameter_names
from .pool import PoolOutput, PromptPool
from .query import PoolQuery
from .system import PoolSpec, PromptState, PromptSystem, prompt_parameter_names

__all__ = ['PoolOutput', 'PoolQuery', 'PoolSpec', 'PromptPool', 'PromptState', 'PromptSystem', 'PromptedBlock',
           'SingleKeyAttention', 'dead_parameter_names', 'prompt_parameter_names']
