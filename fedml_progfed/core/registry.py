"""One small registry type for every "name -> thing" table of the package.

Models, data sets, partitioners, codecs, server optimizers and algorithms
are each looked up by a configured name. Each table is a
:class:`Registry`: registering a name twice is a programming error caught at
import, and looking up an unknown name raises one :class:`KeyError` subclass
that lists what exists, so callers never write if/elif chains over names.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from fedml_progfed.errors import FieldError

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name that is not registered; ``str()`` lists the registered names."""

    def __init__(self, kind: str, name: object, available: list[str]) -> None:
        super().__init__(name)
        self.kind = kind
        self.name = name
        self.available = available

    def __str__(self) -> str:
        return f"unknown {self.kind} {self.name!r}; available: {', '.join(self.available) or '(none)'}"


class Registry(Generic[T]):
    """Names -> entries, with a duplicate check and a helpful miss.

    Parameters
    ----------
    kind
        What the entries are (``"model"``, ``"codec part"``, ...), used in messages.
    normalize
        Maps a user-given name to its key (e.g. lower-casing); identity by default.
    """

    def __init__(self, kind: str, normalize: Callable[[str], str] = lambda name: name) -> None:
        self.kind = kind
        self._normalize = normalize
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; a name registered twice raises ``ValueError``."""
        key = self._normalize(name)
        if key in self._entries:
            raise ValueError(f"{self.kind} {key!r} is registered twice")
        self._entries[key] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda entry: self.add(name, entry)

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[self._normalize(name)]
        except (KeyError, TypeError, AttributeError):
            raise UnknownNameError(self.kind, name, self.names()) from None

    def lookup(self, name: str, field: str) -> T:
        """The entry for a configured value; a miss is a :class:`FieldError` naming ``field``."""
        try:
            return self[name]
        except UnknownNameError as exc:
            raise FieldError(field, f"unknown {name!r}; available: {' | '.join(exc.available)}") from None

    def __contains__(self, name: object) -> bool:
        try:
            return self._normalize(name) in self._entries  # type: ignore[arg-type]
        except (TypeError, AttributeError):
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def items(self):
        return self._entries.items()
