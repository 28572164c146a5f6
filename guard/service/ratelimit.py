"""Rate limits of API keys: a token bucket per key (``rate_limit: {per_second, burst}`` in the key file)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Limiter", "RateLimit", "RateLimiter", "TokenBucket"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RateLimit(_Strict):
    """A token bucket: ``per_second`` requests on average, bursts of up to ``burst`` (default: one second's)."""

    per_second: float = Field(gt=0.0, le=1e6, allow_inf_nan=False)
    burst: int | None = Field(default=None, ge=1, le=1_000_000)

    @property
    def capacity(self) -> int:
        return self.burst if self.burst is not None else max(1, math.ceil(self.per_second))

    def describe(self) -> str:
        return f"{self.per_second:g} requests/s (burst {self.capacity})"


class TokenBucket:
    """``rate`` tokens per second up to ``capacity``; ``take`` spends one or says how long until one is there."""

    def __init__(self, rate: float, capacity: int) -> None:
        self.rate, self.capacity = rate, capacity
        self._tokens = float(capacity)
        self._updated = time.monotonic()

    def take(self) -> float:
        """0.0 if a token was spent, else the seconds until one will be available."""
        wait = self.peek()
        if not wait:
            self._tokens -= 1.0
        return wait

    def peek(self) -> float:
        """0.0 if a token is available (none is spent), else the seconds until one will be."""
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self.rate


@runtime_checkable
class Limiter(Protocol):
    """What the auth middleware asks before admitting a key's request: this process's buckets (``RateLimiter``), or
    buckets every replica of a deployment shares (``guard.service.ray_serve``). Async, so a limiter that asks
    another process does not block the event loop."""

    async def acquire(self, key_id: str, limit: RateLimit | None) -> float:
        """0.0 if the request may go ahead (a token is spent), else the seconds to wait (``Retry-After``)."""
        ...


class RateLimiter:
    """One token bucket per key id, made on first use from the key's ``RateLimit`` (per process)."""

    def __init__(self) -> None:
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def admit(self, key_id: str, limit: RateLimit | None) -> float:
        """0.0 if the request may go ahead (a token is spent), else the seconds to wait (``Retry-After``)."""
        return self._bucket_call(key_id, limit, TokenBucket.take)

    async def acquire(self, key_id: str, limit: RateLimit | None) -> float:
        """``admit`` for the middleware (``Limiter``): local buckets answer at once."""
        return self.admit(key_id, limit)

    def peek(self, key_id: str, limit: RateLimit | None) -> float:
        """Like ``admit``, without spending a token."""
        return self._bucket_call(key_id, limit, TokenBucket.peek)

    def _bucket_call(self, key_id: str, limit: RateLimit | None, call: Callable[[TokenBucket], float]) -> float:
        if limit is None:
            return 0.0
        with self._lock:
            bucket = self._buckets.get(key_id)
            if bucket is None:
                bucket = self._buckets[key_id] = TokenBucket(limit.per_second, limit.capacity)
            return call(bucket)
