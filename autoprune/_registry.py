"""Two small helpers shared across layers (no torch, no Optuna):

- :class:`Registry`: named items (criteria, allocations, schedules, size objectives, samplers,
  parametrizations) in registration order, so that a spec or a trial chooses one by name.
- :func:`check_keys`, :func:`from_dict` and :func:`to_dict`: the plain-data round trip of a
  frozen settings dataclass (``SearchSpace``, ``WarmStart``, ``Constraints`` ...), refusing
  keys that are not fields.

Errors are :class:`~autoprune.errors.SpecError` with one line naming the bad value and listing
the known ones in the order they were declared (registered, or written as fields).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from autoprune.errors import SpecError

T = TypeVar("T")
D = TypeVar("D")


class Registry(Generic[T]):
    """Items by name, in registration order.

    Reads like a read-only mapping: ``name in r``, ``r[name]``, ``list(r)``, ``len(r)``,
    ``r.items()``; ``r[name]`` and ``r.get(name)`` raise :class:`SpecError` on an unknown name.

    Args:
        kind: What the items are, in the singular (``"criterion"``); it starts the messages.
        items: Items to register at once, by name, in order.
    """

    def __init__(self, kind: str, items: Mapping[str, T] | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        for name, item in (items or {}).items():
            self.register(name, item)

    def register(self, name: str, item: T, *, replace: bool = False) -> T:
        """Add ``item`` under ``name`` and return it (a replaced item keeps its place).

        Raises:
            SpecError: If ``name`` is not a non-empty string, or is taken and not ``replace``.
        """
        if not isinstance(name, str) or not name:
            raise SpecError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._items and not replace:
            raise SpecError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return its item (e.g. a test's temporary criterion)."""
        item = self.get(name)
        del self._items[name]
        return item

    def get(self, name: str) -> T:
        """The item registered as ``name``.

        Raises:
            SpecError: ``unknown <kind> 'name' (known: a, b, c)``.
        """
        if name not in self:
            known = ", ".join(self._items) or "none"
            raise SpecError(f"unknown {self.kind} {name!r} (known: {known})")
        return self._items[name]

    __getitem__ = get

    def __contains__(self, name: object) -> bool:
        # A str test first: a spec's value may be unhashable (a TOML list or table).
        return isinstance(name, str) and name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._items)

    def items(self) -> list[tuple[str, T]]:
        """``(name, item)`` pairs, in registration order."""
        return list(self._items.items())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"


def field_names(cls: type) -> tuple[str, ...]:
    """The field names of dataclass ``cls``, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls))


def check_keys(data: Mapping[str, Any], known: type | Iterable[str], what: str) -> None:
    """Refuse the first key of ``data`` that is not in ``known``.

    Args:
        data: Plain data, e.g. a TOML table or a stored dict.
        known: A dataclass (its fields are the known keys) or the known keys, in the order the
            message lists them.
        what: The noun of the message, e.g. ``"warm-start key"`` or ``"constraint"``.

    Raises:
        SpecError: ``unknown <what> 'x' (known: a, b)``.
    """
    names = field_names(known) if isinstance(known, type) else tuple(known)
    for key in data:
        if key not in names:
            raise SpecError(f"unknown {what} {key!r} (known: {', '.join(names)})")


def from_dict(cls: type[D], data: Mapping[str, Any], what: str) -> D:
    """``cls(**data)`` for a settings dataclass, after :func:`check_keys`; missing keys take
    their defaults. The dataclass validates and normalises the values (lists to tuples) in its
    ``__post_init__``.

    Args:
        cls: The dataclass.
        data: Its plain data (e.g. from :func:`to_dict`, JSON or TOML).
        what: The noun of the unknown-key message, e.g. ``"search-space key"``.

    Raises:
        SpecError: On an unknown key, or whatever ``cls`` refuses.
    """
    check_keys(data, cls, what)
    return cls(**data)


def to_dict(obj: Any) -> dict[str, Any]:
    """The fields of dataclass instance ``obj`` as plain JSON data: tuples become lists.

    For dataclasses whose fields are scalars and tuples of scalars; nested values are kept.
    """
    return {
        name: list(value) if isinstance(value, tuple) else value
        for name in field_names(type(obj))
        for value in [getattr(obj, name)]
    }
