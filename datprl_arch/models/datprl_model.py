"""The DATPRL restoration model for BasicSR's runners (registered also as the official ``ALLINONEModel``).

It is BasicSR's SRModel with checkpoint loading that accepts every format DATPRL users have (see
``datprl_arch.utils.checkpoint``): ``pretrain_network_g`` may point to a BasicSR file, an official Lightning
``.ckpt``, a plain state_dict or a ``.safetensors`` file.
"""
from __future__ import annotations

from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY

from ..utils.checkpoint import load_checkpoint
from ..utils.registry import register


@register(MODEL_REGISTRY, aliases=('ALLINONEModel',))
class DATPRLModel(SRModel):
    """SRModel whose ``load_network`` reads BasicSR, Lightning, plain and safetensors checkpoints."""

    def load_network(self, net, load_path, strict=True, param_key='params'):
        """Load ``load_path`` into ``net``; ``param_key`` is preferred when the file has it, else the format decides."""
        get_root_logger().info(f'Loading {type(getattr(net, "module", net)).__name__} from {load_path}')
        load_checkpoint(net, load_path, param_key=param_key, strict=strict)
