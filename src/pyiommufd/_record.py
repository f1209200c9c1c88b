"""Small record classes for the interface modules, without ``dataclasses``.

``dataclasses`` pulls in ``inspect`` (and with it ``ast``, ``dis``,
``tokenize``...) and compiles several methods per class: about 20 ms of
import time for the interface modules. :func:`record` gives the same
constructor, ``repr``, equality, hashing and immutability for the plain
cases used here, with one compiled ``__init__`` per class.

    @record(frozen=True)
    class IovaRange:
        start: int
        last: int

Fields are the class annotations, in order; a class attribute is the
default; :func:`hidden` leaves a field out of ``repr`` and ``==``;
:func:`factory` makes a fresh default per instance (``field(default_factory=)``).

Type checkers see :func:`record` as a dataclass transform (PEP 681) with
:func:`factory` and :func:`hidden` as its field specifiers. They read a
field's default only from a keyword argument, so write
``factory(default_factory=list)`` and ``hidden(default=None)``.
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar, dataclass_transform, overload

_MISSING: Any = object()
_T = TypeVar("_T")


class FrozenRecordError(AttributeError):
    """Assignment to a field of a frozen record."""


class _Spec:
    __slots__ = ("default", "make", "shown", "compared")

    def __init__(self, default: Any = _MISSING, make: Callable[[], Any] | None = None,
                 shown: bool = True, compared: bool | None = None) -> None:
        self.default, self.make, self.shown = default, make, shown
        self.compared = shown if compared is None else compared


# Both return the field's value as far as a type checker knows (Any): the
# decorator replaces the _Spec in the class body.
def factory(default_factory: Callable[[], Any], *, shown: bool = True) -> Any:
    """A default built by ``default_factory()`` for every instance."""
    return _Spec(make=default_factory, shown=shown)


def hidden(default: Any = None, *, compare: bool = False) -> Any:
    """A field left out of ``repr`` (and of equality unless ``compare``),
    e.g. a buffer kept alive."""
    return _Spec(default=default, shown=False, compared=compare)


def _frozen_setattr(self: object, name: str, value: object = None) -> None:
    raise FrozenRecordError(f"cannot assign to field {name!r} of a frozen {type(self).__name__}")


def _repr(self: Any) -> str:
    shown = ", ".join(f"{n}={getattr(self, n)!r}" for n in type(self).__record_shown__)
    return f"{type(self).__qualname__}({shown})"


def _key(self: Any) -> tuple[Any, ...]:
    return tuple(getattr(self, n) for n in type(self).__record_compared__)


def _eq(self: object, other: object) -> Any:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _key(self) == _key(other)


def _hash(self: object) -> int:
    return hash(_key(self))


@overload
def record(cls: type[_T]) -> type[_T]: ...
@overload
def record(cls: None = None, *, frozen: bool = False) -> Callable[[type[_T]], type[_T]]: ...


@dataclass_transform(field_specifiers=(factory, hidden))
def record(cls: type[_T] | None = None, *,
           frozen: bool = False) -> type[_T] | Callable[[type[_T]], type[_T]]:
    """Make ``cls`` a record class (see the module docstring)."""

    def wrap(cls: Any) -> Any:
        names = list(cls.__dict__.get("__annotations__", {}))
        params: list[str] = []
        body: list[str] = []
        env: dict[str, Any] = {"_MISSING": _MISSING}
        shown: list[str] = []
        compared: list[str] = []
        assign = "_set(self, {0!r}, {1})" if frozen else "self.{0} = {1}"
        for name in names:
            value = cls.__dict__.get(name, _MISSING)
            spec = value if isinstance(value, _Spec) else _Spec(default=value)
            if isinstance(value, _Spec):
                if spec.default is _MISSING:
                    delattr(cls, name)
                else:
                    setattr(cls, name, spec.default)
            if spec.shown:
                shown.append(name)
            if spec.compared:
                compared.append(name)
            if spec.make is not None:
                env[f"_make_{name}"] = spec.make
                params.append(f"{name}=_MISSING")
                body.append(assign.format(name, f"_make_{name}() if {name} is _MISSING else {name}"))
            elif spec.default is not _MISSING:
                env[f"_default_{name}"] = spec.default
                params.append(f"{name}=_default_{name}")
                body.append(assign.format(name, name))
            else:
                if any("=" in p for p in params):
                    raise TypeError(f"{cls.__name__}: field {name!r} without a default follows one with a default")
                params.append(name)
                body.append(assign.format(name, name))
        env["_set"] = object.__setattr__
        src = f"def __init__(self, {', '.join(params)}):\n    " + ("\n    ".join(body) or "pass")
        exec(src, env)  # noqa: S102 - our own generated constructor, as dataclasses does
        init = env["__init__"]
        init.__qualname__ = f"{cls.__qualname__}.__init__"
        cls.__init__ = init
        cls.__record_fields__ = tuple(names)
        cls.__record_shown__ = tuple(shown)
        cls.__record_compared__ = tuple(compared)
        if "__repr__" not in cls.__dict__:
            cls.__repr__ = _repr
        cls.__eq__ = _eq
        if frozen:
            cls.__setattr__ = _frozen_setattr
            cls.__delattr__ = _frozen_setattr
            cls.__hash__ = _hash
        else:
            cls.__hash__ = None
        return cls

    return wrap if cls is None else wrap(cls)


def fields(obj: Any) -> tuple[str, ...]:
    names: tuple[str, ...] = type(obj).__record_fields__
    return names


def asdict(obj: Any) -> Any:
    """Fields as a dict, recursing into records, lists, tuples and dicts."""
    if hasattr(type(obj), "__record_fields__"):
        return {n: asdict(getattr(obj, n)) for n in type(obj).__record_fields__}
    if isinstance(obj, (list, tuple)):
        return type(obj)(asdict(v) for v in obj)
    if isinstance(obj, dict):
        return {asdict(k): asdict(v) for k, v in obj.items()}
    return obj


def replace(obj: _T, **changes: Any) -> _T:
    kwargs = {n: getattr(obj, n) for n in fields(obj)}
    kwargs.update(changes)
    return type(obj)(**kwargs)
