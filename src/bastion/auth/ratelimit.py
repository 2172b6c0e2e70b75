"""A bound on failed authentications per client address: more than ``limit`` in a minute and the address is
answered 429 (with ``Retry-After``) until its oldest failure is a minute old.

Memory is bounded: at most :data:`MAX_ADDRESSES` addresses are tracked (the least recently failing one is
forgotten first) and at most ``limit`` failure times each.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque

MAX_ADDRESSES = 10_000
WINDOW = 60.0


class FailureLimiter:
    """Counts failed authentications per address over a sliding minute."""

    def __init__(self, limit: int, window: float = WINDOW, max_addresses: int = MAX_ADDRESSES) -> None:
        self.limit, self.window, self.max_addresses = max(1, limit), window, max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, address: str, now: float | None = None) -> int:
        """Seconds until ``address`` may try again; 0 when it may now."""
        times = self._failures.get(address)
        if not times or len(times) < self.limit:
            return 0
        now = time.monotonic() if now is None else now
        wait = times[0] + self.window - now
        return max(1, math.ceil(wait)) if wait > 0 else 0

    def failed(self, address: str, now: float | None = None) -> None:
        """Count one failed authentication from ``address``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            times = self._failures.pop(address, None) or deque(maxlen=self.limit)
            while times and times[0] + self.window <= now:
                times.popleft()
            times.append(now)
            self._failures[address] = times
            while len(self._failures) > self.max_addresses:
                self._failures.popitem(last=False)

    def __len__(self) -> int:
        return len(self._failures)
