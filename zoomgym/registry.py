"""Registries (name -> entry) for every extension point, and lazy package exports.

A `Registry` maps a name to an entry (a function, a class, a frame): filled by a decorator or a call,
looked up by the name a config or an argument gives. An entry may be registered as a ``"module:attr"``
string, imported on first lookup, so that a registry of heavy classes (torch, vLLM) costs nothing to
import. An unknown name raises ``ValueError`` listing the known ones with a "did you mean"; a taken
name raises ``ValueError``.

>>> widgets = Registry("widget")
>>> @widgets.register("alpha")
... def alpha():
...     return 1
>>> widgets.lookup("alpha") is alpha, sorted(widgets)
(True, ['alpha'])
>>> widgets.lookup("alpah")
Traceback (most recent call last):
...
ValueError: Expects widget name in ['alpha'], actual: 'alpah'. Did you mean 'alpha'?
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")

__all__ = ["Registry", "lazy_exports", "suggest"]


def suggest(name: object, known: list[str]) -> str:
    """``" Did you mean 'x'?"`` for the known name closest to ``name``, or ``""``."""
    close = difflib.get_close_matches(str(name), known, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _resolve(entry: str) -> Any:
    module, _, attr = entry.partition(":")
    return getattr(importlib.import_module(module), attr)


class Registry(Mapping[str, T], Generic[T]):
    """A name -> entry mapping filled by ``register``; iterates over names, ``registry[name]`` looks up.

    Args:
        kind: what the registry holds, used in error messages ("advantage estimator").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T | str] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, entry: T | str) -> T | str: ...

    def register(self, name: str, entry: Any = None) -> Any:
        """Adds ``entry`` under ``name`` (must be new) and returns it; without ``entry``, a decorator.

        ``entry`` may be a ``"module:attr"`` string, imported on the first lookup.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"Expects a non-empty string as {self.kind} name, actual: {name!r}")

        def add(value: Any) -> Any:
            if name in self._entries:
                taken = self._entries[name]
                raise ValueError(
                    f"Expects a new {self.kind} name, actual: {name!r} is already registered "
                    f"to {getattr(taken, '__qualname__', taken)}"
                )
            self._entries[name] = value
            return value

        return add if entry is None else add(entry)

    def lookup(self, name: str) -> T:
        """The entry registered as ``name``; ``ValueError`` naming the known ones otherwise."""
        if name not in self._entries:
            known = sorted(self._entries)
            raise ValueError(f"Expects {self.kind} name in {known}, actual: {name!r}.{suggest(name, known)}")
        entry = self._entries[name]
        if isinstance(entry, str):
            entry = self._entries[name] = _resolve(entry)
        return entry  # type: ignore[return-value]

    def pop(self, name: str) -> T | str:
        """Removes ``name`` (a test's or a plugin's registration) and returns its entry."""
        return self._entries.pop(name)

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise KeyError(name)
        return self.lookup(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """PEP 562 ``__getattr__`` and ``__dir__`` for a package whose public names live in submodules
    imported on first use (so ``import package`` stays light: no torch, no transformers).

    Args:
        package: the package's ``__name__``.
        exports: public name -> module that defines it.

    Use in the package's ``__init__.py``: ``__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)``.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    def __dir__() -> list[str]:
        return sorted(set(exports) | set(importlib.import_module(package).__dict__))

    return __getattr__, __dir__
