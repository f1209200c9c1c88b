"""The one place the VM reliability tests turn what ``Session.retrieve`` and
``Session.retrieve_all`` return (:class:`pyiommufd.luo.RetrievedFile`) into memfds."""
from __future__ import annotations

from typing import Iterable

from pyiommufd.luo import Session
from pyiommufd.memfd import MemFD


def retrieved_memfd(session: Session, token: int) -> MemFD:
    return MemFD.from_fd(session.retrieve(token).fd)


def retrieved_memfds(session: Session, tokens: Iterable[int]) -> dict[int, MemFD]:
    return {token: MemFD.from_fd(got.fd) for token, got in session.retrieve_all(tokens).items()}
