"""``--lu-abi`` and ``$PYIOMMUFD_LU_ABI``, the same for every command.

The spellings are :func:`pyiommufd.abi.parse_lu_abi`'s. The variable is read
here, in the CLI, and its value passed down: the library never reads it.
:mod:`pyiommufd.abi` (cffi, dataclasses) is imported only when a value is
checked, so loading a command module stays cheap.
"""
from __future__ import annotations

import os
from typing import Callable, TypeVar

import click

from ..errors import UsageError

F = TypeVar("F", bound=Callable[..., object])

ENV_ABI = "PYIOMMUFD_LU_ABI"  # pyiommufd.abi.ENV_ABI, without importing it
SPELLED = "lu-v1 (or v1, set), lu-v2 (or v2, mark) or probe"
HELP = f"Revision of the LU mark ioctl: {SPELLED} (default: ${ENV_ABI}, else probe)."


def lu_abi_option(help: str = HELP) -> Callable[[F], F]:
    return click.option("--lu-abi", default=None, metavar="REVISION", help=help)


def _canonical(spelling: str, where: str) -> str:
    from .. import abi

    try:
        return abi.canonical_lu_abi(spelling)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None


def check_env_nr() -> None:
    """A bad ``$PYIOMMUFD_LU_NR`` is bad input before anything runs."""
    from .. import abi

    abi.configured_nr()


def option_lu_abi(given: str | None) -> str | None:
    """``--lu-abi`` as ``lu-v1``, ``lu-v2`` or ``probe``; None when not given."""
    return None if given is None else _canonical(given, "--lu-abi")


def env_lu_abi() -> str | None:
    """``$PYIOMMUFD_LU_ABI`` as ``lu-v1``, ``lu-v2`` or ``probe``; None when unset or empty."""
    value = os.environ.get(ENV_ABI)
    return _canonical(value, f"${ENV_ABI}") if value else None


def resolve_lu_abi(given: str | None) -> str | None:
    """``--lu-abi``, else ``$PYIOMMUFD_LU_ABI``; None (a probe) when neither is set."""
    check_env_nr()
    chosen = option_lu_abi(given)
    return chosen if chosen is not None else env_lu_abi()
