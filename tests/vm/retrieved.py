"""The one place the VM reliability tests turn what ``Session.retrieve`` and
``Session.retrieve_all`` return into memfds (their return type is changing)."""
from __future__ import annotations

from typing import Iterable

from pyiommufd.luo import Session
from pyiommufd.memfd import MemFD


def retrieved_memfd(session: Session, token: int) -> MemFD:
    return MemFD.from_fd(session.retrieve(token))


def retrieved_memfds(session: Session, tokens: Iterable[int]) -> dict[int, MemFD]:
    return {token: MemFD.from_fd(fd) for token, fd in session.retrieve_all(tokens).items()}
