"""The backbone-independent prompt system: its configuration, pools, queries, composition and gated fusion."""
from .compose import SingleKeyAttention
from .config import PROMPT_ARGUMENTS, TASK_POOL_ARGUMENTS, PromptConfig
from .fusion import BlockStack, GatedFusion, PromptedBlock, dead_parameter_names, set_checkpointing
from .pool import PoolOutput, PoolSpec, PromptPool
from .query import PoolQuery
from .system import PromptState, PromptSystem, prompt_parameter_names

__all__ = ['PROMPT_ARGUMENTS', 'TASK_POOL_ARGUMENTS', 'BlockStack', 'GatedFusion', 'PoolOutput', 'PoolQuery',
           'PoolSpec', 'PromptConfig', 'PromptPool', 'PromptState', 'PromptSystem', 'PromptedBlock',
           'SingleKeyAttention', 'dead_parameter_names', 'prompt_parameter_names', 'set_checkpointing']
