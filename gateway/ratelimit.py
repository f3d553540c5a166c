"""Local token-bucket rate limiting (per gateway process), keyed by route/service and a client key."""

from __future__ import annotations

import math
import time
from collections import OrderedDict

MAX_BUCKETS = 100_000


class RateLimiter:
    """``allow(scope, key, rate, burst)`` -> 0 when allowed, else seconds until a token is available."""

    def __init__(self, max_buckets: int = MAX_BUCKETS) -> None:
        self._buckets: OrderedDict[tuple[str, str], list[float]] = OrderedDict()
        self._max = max_buckets

    def allow(self, scope: str, key: str, rate: float, burst: int) -> float:
        now = time.monotonic()
        bucket_id = (scope, key)
        bucket = self._buckets.get(bucket_id)
        if bucket is None:
            bucket = [float(burst), now]
            self._buckets[bucket_id] = bucket
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)  # forget the least recently used client
        else:
            self._buckets.move_to_end(bucket_id)
            tokens = min(float(burst), bucket[0] + (now - bucket[1]) * rate)
            bucket[0], bucket[1] = tokens, now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return 0.0
        return (1.0 - bucket[0]) / rate


def retry_after_header(wait: float) -> bytes:
    return str(max(1, math.ceil(wait))).encode()
