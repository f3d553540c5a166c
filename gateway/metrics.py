"""Request metrics kept in plain dicts (cheap on the hot path) and rendered as Prometheus text."""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Final

BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_bisect_left: Final = bisect.bisect_left
_CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx")


class _ServiceStats:
    """One service's requests: counts by zone and status class (1xx..5xx), and a latency histogram."""

    __slots__ = ("by_zone", "hist", "sum")

    def __init__(self) -> None:
        self.by_zone: dict[str, list[int]] = {}
        self.hist = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0


class Metrics:
    """Counters by (service, zone, code class) and a latency histogram per service."""

    def __init__(self) -> None:
        self.errors: defaultdict[str, int] = defaultdict(int)
        self._services: dict[str, _ServiceStats] = {}
        self.gauges: dict[str, Callable[[], float]] = {}
        self.counters: dict[str, Callable[[], float]] = {}

    def observe(self, service: str, zone: str, status: int, seconds: float) -> None:
        stats = self._stats(service)
        counts = stats.by_zone.get(zone)
        if counts is None:
            counts = stats.by_zone[zone] = [0] * len(_CLASSES)
        counts[min(max(status // 100, 1), 5) - 1] += 1
        stats.hist[_bisect_left(BUCKETS, seconds)] += 1
        stats.sum += seconds

    @property
    def requests(self) -> dict[tuple[str, str, str], int]:
        """Request counts by (service, zone, status class)."""
        out = {}
        for service, stats in self._services.items():
            for zone, counts in stats.by_zone.items():
                for code, n in zip(_CLASSES, counts, strict=True):
                    if n:
                        out[(service, zone, code)] = n
        return out

    def export(self) -> dict:
        """A JSON-able copy of the counters (for merging the workers of one gateway)."""
        return {
            "requests": [[*k, v] for k, v in self.requests.items()],
            "errors": dict(self.errors),
            "hist": {k: list(v.hist) for k, v in self._services.items()},
            "sum": {k: v.sum for k, v in self._services.items()},
            "counters": {k: fn() for k, fn in self.counters.items()},
        }

    def merged(self, others: list[dict]) -> Metrics:
        """These metrics plus other workers' exports; gauges (shared state such as the catalog) stay ours."""
        out = Metrics()
        out.gauges = self.gauges
        for data in [self.export(), *others]:
            for service, zone, code, n in data["requests"]:
                stats = out._stats(service)
                counts = stats.by_zone.setdefault(zone, [0] * len(_CLASSES))
                counts[_CLASSES.index(code)] += n
            for code, n in data["errors"].items():
                out.errors[code] += n
            for service, counts in data["hist"].items():
                hist = out._stats(service).hist
                for i, n in enumerate(counts):
                    hist[i] += n
            for service, total in data["sum"].items():
                out._stats(service).sum += total
            for name, value in data["counters"].items():
                prev = out.counters.get(name)
                base = prev() if prev else 0
                out.counters[name] = _constant(base + value)
        return out

    def _stats(self, service: str) -> _ServiceStats:
        stats = self._services.get(service)
        if stats is None:
            stats = self._services[service] = _ServiceStats()
        return stats

    def render(self) -> str:
        out: list[str] = []
        out += _header(
            "zonemesh_requests_total", "counter", "Requests by upstream service, zone and status class"
        )
        for (service, zone, code), n in sorted(self.requests.items()):
            out.append(
                f'zonemesh_requests_total{{service="{_esc(service)}",zone="{zone}",code="{code}"}} {n}'
            )
        out += _header("zonemesh_errors_total", "counter", "Gateway-generated error responses by code")
        for code, n in sorted(self.errors.items()):
            out.append(f'zonemesh_errors_total{{error="{code}"}} {n}')
        name = "zonemesh_request_duration_seconds"
        out += _header(name, "histogram", "Time from request start to the last response byte")
        for service, stats in sorted(self._services.items()):
            hist = stats.hist
            label = f'service="{_esc(service)}"'
            acc = 0
            for bound, count in zip(BUCKETS, hist, strict=False):
                acc += count
                out.append(f'{name}_bucket{{{label},le="{bound}"}} {acc}')
            acc += hist[-1]
            out.append(f'{name}_bucket{{{label},le="+Inf"}} {acc}')
            out.append(f"{name}_sum{{{label}}} {stats.sum:.6f}")
            out.append(f"{name}_count{{{label}}} {acc}")
        for kind, items in (("counter", self.counters), ("gauge", self.gauges)):
            for metric, fn in sorted(items.items()):
                out += _header(metric, kind, metric.replace("_", " "))
                out.append(f"{metric} {fn():g}")
        return "\n".join(out) + "\n"


def _constant(value: float) -> Callable[[], float]:
    return lambda: value


def _header(name: str, kind: str, help_text: str) -> Iterable[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
