"""In-transaction listeners: how the notifier and the ticket feed hear of alert transitions and ticket changes.

A listener is called with the caller's session, inside its transaction, so what it writes (an outbox row) commits
or rolls back with the change; an exception in it rolls the change back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from sqlalchemy.orm import Session

E = TypeVar("E")


class Listeners(Generic[E]):
    def __init__(self) -> None:
        self._listeners: list[Callable[[Session, E], None]] = []

    def subscribe(self, listener: Callable[[Session, E], None]) -> Callable[[], None]:
        """Call ``listener(session, event)`` for every event; returns the function that unsubscribes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def emit(self, session: Session, event: E) -> None:
        for listener in tuple(self._listeners):
            listener(session, event)
