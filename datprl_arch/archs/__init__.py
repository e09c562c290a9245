"""Networks of datprl, registered into BasicSR's ARCH_REGISTRY on import."""
from . import datprl_arch, nafnet_arch, prompted_backbone_arch, restormer_arch  # noqa: F401  (registration)
