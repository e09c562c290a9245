"""Models of datprl, registered into BasicSR's MODEL_REGISTRY on import."""
from . import datprl_model  # noqa: F401  (registration)
