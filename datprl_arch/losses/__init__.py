"""Losses of datprl, registered into BasicSR's LOSS_REGISTRY on import.

``DATPRLFFTLoss`` (alias ``FFTLoss``) is the official frequency loss; the prompt-pool losses implement the
training options the official release names but does not implement (see docs/method.md): diversity, balance,
supervised contrastive and domain-prior (text) alignment. The description embeddings the alignment reads are
``datprl_arch.priors``; the prompt-usage statistics are ``models.prompt_usage``.
"""
from . import alignment_loss, balance_loss, contrastive_loss, diversity_loss, fft_loss  # noqa: F401  (registration)
from .alignment_loss import DATPRLDomainAlignmentLoss, TextSpaceProjection
from .balance_loss import DATPRLBalanceLoss
from .contrastive_loss import DATPRLSupConLoss
from .diversity_loss import DATPRLDiversityLoss
from .fft_loss import DATPRLFFTLoss

__all__ = ['DATPRLBalanceLoss', 'DATPRLDiversityLoss', 'DATPRLDomainAlignmentLoss', 'DATPRLFFTLoss', 'DATPRLSupConLoss',
           'TextSpaceProjection']
