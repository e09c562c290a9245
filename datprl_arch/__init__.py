"""datprl: DATPRL-IR all-in-one image restoration as a BasicSR plugin.

Importing this package first makes basicsr 1.4.2 work on the current stack (``_compat``), then registers every
network, dataset, loss and model of the project into BasicSR's registries. Nothing else happens at import time
(in particular no logger is created: BasicSR's root logger must be configured by its runners first).
"""
from . import _compat  # noqa: F401  (must precede every basicsr import)
from . import archs, data, losses, models  # noqa: F401,E402  (registration)
from .version import __version__  # noqa: F401
