"""basicsr 1.4.2 on torch 2.14 / torchvision 0.29 / numpy 2 / lmdb 3 / CPU.  (placeholder, filled by the foundation work)"""
import sys


def _alias_functional_tensor() -> None:
    name = 'torchvision.transforms.functional_tensor'
    if name in sys.modules:
        return
    try:
        import torchvision.transforms._functional_tensor as ft
    except ImportError:  # torchvision < 0.17 still ships the public module
        return
    sys.modules[name] = ft


_alias_functional_tensor()
