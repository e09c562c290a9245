"""Idempotent registration into BasicSR's global registries.

BasicSR's ``Registry.register`` asserts that a name is new, so importing a module twice (``importlib.reload``,
or the same file under two module names) or two plugins choosing one name ends in a bare ``AssertionError``.
``register`` here treats a re-import of the *same* class as harmless and reports a real clash with both origins.
"""
from __future__ import annotations

from typing import Callable, Iterable, TypeVar

from basicsr.utils.registry import Registry

T = TypeVar('T')


def _origin(obj) -> str:
    return f'{obj.__module__}.{obj.__qualname__}'


def register(registry: Registry, aliases: Iterable[str] = ()) -> Callable[[T], T]:
    """Decorator: register ``obj`` under ``obj.__name__`` and every name in ``aliases``.

    Re-registering an object with the same module and qualified name replaces the old entry (a re-import);
    a different object under a taken name raises ``KeyError`` naming both.
    """

    def deco(obj: T) -> T:
        for name in (obj.__name__, *aliases):
            existing = registry._obj_map.get(name)
            if existing is not None and _origin(existing) != _origin(obj):
                raise KeyError(f"Cannot register {_origin(obj)} as '{name}' in BasicSR's {registry._name} registry: "
                               f'the name is taken by {_origin(existing)}. Import only one of the two packages, '
                               f'or use the other name this package registers for the class.')
            registry._obj_map[name] = obj
        return obj

    return deco
