"""Losses of datprl, registered into BasicSR's LOSS_REGISTRY on import.

``DATPRLFFTLoss`` (alias ``FFTLoss``) is the official frequency loss; the prompt-pool losses implement the
training options the official release names but does not implement (see docs/method.md): diversity, balance,
supervised contrastive and domain-prior (text) alignment. ``prompt_usage`` keeps hard usage statistics and
``description_embeddings`` reads the domain priors written by ``python -m datprl_arch.tools.encode_descriptions``.
"""
from . import alignment_loss, balance_loss, contrastive_loss, diversity_loss, fft_loss  # noqa: F401  (registration)
from .alignment_loss import DATPRLDomainAlignmentLoss, TextSpaceProjection
from .balance_loss import DATPRLBalanceLoss
from .contrastive_loss import DATPRLSupConLoss
from .description_embeddings import DescriptionEmbeddings, load_description_embeddings
from .diversity_loss import DATPRLDiversityLoss
from .fft_loss import DATPRLFFTLoss
from .prompt_usage import PoolUsage, PromptUsageTracker, reinitialise_prompts

__all__ = ['DATPRLBalanceLoss', 'DATPRLDiversityLoss', 'DATPRLDomainAlignmentLoss', 'DATPRLFFTLoss', 'DATPRLSupConLoss',
           'DescriptionEmbeddings', 'PoolUsage', 'PromptUsageTracker', 'TextSpaceProjection',
           'load_description_embeddings', 'reinitialise_prompts']
