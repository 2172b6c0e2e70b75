"""A blob store that could not be opened at start (:class:`LateStore`), standing in for it among the copies until
it opens; and how long a store that failed is left alone (:data:`RETRY_AFTER_S`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO

from bastion.blobs.base import BlobStore, BlobWriter
from bastion.blobs.findings import UNREADABLE
from bastion.errors import BastionError, StorageError

log = logging.getLogger("bastion.blobs")

#: A store that failed a write (or could not be opened) is left out of new writes for this many seconds, then
#: tried again.
RETRY_AFTER_S = 30.0


class LateStore(BlobStore):
    """A blob store that could not be opened at start: every call fails (:class:`~bastion.errors.StorageError`)
    until the store opens, tried again at most every ``retry_after_s``; then each call goes to it. Its
    :class:`Copies` leaves it out meanwhile, as it does a store that fails writes: each object stored is a
    finding ``not written`` there, and the repair makes the copies once it is back."""

    def __init__(self, location: str, opener: Callable[[], BlobStore], error: BaseException,
                 retry_after_s: float = RETRY_AFTER_S) -> None:
        self.location = location
        self.retry_after_s = retry_after_s
        self._opener = opener
        self._store: BlobStore | None = None
        self._error = error
        self._tried_at = time.monotonic()
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return f"{self.location}: {self._error}"

    def _opened(self) -> BlobStore:
        store = self._store
        if store is not None:
            return store
        with self._lock:
            if self._store is None and time.monotonic() - self._tried_at >= self.retry_after_s:
                self._tried_at = time.monotonic()
                try:
                    self._store = self._opener()
                    log.warning("blob store %s is open now", self.location)
                except (BastionError, OSError) as exc:
                    self._error = exc
            if self._store is None:
                raise StorageError(f"blob store {self.location} cannot be opened: {self._error}")
            return self._store

    def writer(self) -> BlobWriter:
        return self._opened().writer()

    def put_once(self, key: str, data: bytes) -> bool:
        return self._opened().put_once(key, data)

    def open(self, key: str) -> BinaryIO:
        return self._opened().open(key)

    def open_verified(self, key: str) -> BinaryIO:
        return self._opened().open_verified(key)

    def problem_with(self, key: str) -> str | None:
        try:
            store = self._opened()
        except StorageError as exc:
            return f"{UNREADABLE}: {exc.message}"
        return store.problem_with(key)

    def size(self, key: str) -> int:
        return self._opened().size(key)

    def delete(self, key: str) -> None:
        self._opened().delete(key)

    def destroy(self, key: str) -> None:
        self._opened().destroy(key)

    def set_aside(self, key: str) -> str | None:
        return self._opened().set_aside(key)

    def keys(self, prefix: str = "") -> Iterator[str]:
        return self._opened().keys(prefix)

    def exists(self, key: str) -> bool:
        return self._opened().exists(key)

    def set_aside_count(self) -> int:
        return 0 if self._store is None else self._store.set_aside_count()

    def usage(self) -> tuple[int | None, int | None]:
        return self._opened().usage()

    def revive(self) -> bool:
        return self._opened().revive()

    def prepare(self) -> None:
        if self._store is not None:
            self._store.prepare()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
