"""Just enough of the Prometheus text exposition format (version 0.0.4) for the server's counters and histograms.

Updated from the event loop only, so no locks. Each server worker process keeps its own numbers."""
from __future__ import annotations

import bisect
from collections import defaultdict

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    escaped = (v.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n") for _, v in pairs)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(pairs, escaped)) + "}"


class Counter:
    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self.values: dict[tuple, float] = defaultdict(float)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] += amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        return lines + [f"{self.name}{_labels(k)} {v:g}" for k, v in sorted(self.values.items())]


class Histogram:
    def __init__(self, name: str, help: str, buckets: list[float]):
        self.name, self.help, self.buckets = name, help, sorted(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip([f"{b:g}" for b in self.buckets] + ["+Inf"], self.counts):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        return lines + [f"{self.name}_sum {self.sum:g}", f"{self.name}_count {cumulative}"]


class Registry:
    def __init__(self, *metrics):
        self.metrics = metrics

    def render(self) -> str:
        return "\n".join(line for m in self.metrics for line in m.render()) + "\n"
