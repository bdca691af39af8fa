"""Parse trtexec's performance summary (TensorRT 8.x to 11.x) and its version banner.

Tolerant by design: the ``[MM/DD/YYYY-HH:MM:SS] [I]`` prefix may be missing (logs pasted into issues), numbers may
be in scientific notation, the percentile list follows ``--percentile`` (8.4 and older print 99 only), and a
lost ``=`` (``max 6.19 ms``) still parses.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_PREFIX = re.compile(r"^\s*(?:\[\d\d/\d\d/\d{4}-\d\d:\d\d:\d\d\]\s*)?(?:\[[IWEVF]\]\s*)?")
_METRICS = {
    "Latency": "latency",
    "Enqueue Time": "enqueue",
    "H2D Latency": "h2d",
    "GPU Compute Time": "gpu_compute",
    "D2H Latency": "d2h",
}
_STAT = re.compile(rf"(min|max|mean|median|percentile\((\d+(?:\.\d+)?)%\))\s*=?\s*({_NUM})\s*ms")
_BANNER = re.compile(r"\[TensorRT v(\d+)\]")
_VERSION_LINE = re.compile(r"TensorRT version:\s*(\d+)\.(\d+)\.(\d+)")


@dataclass
class Stats:
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    median: float | None = None
    percentiles: dict[str, float] = field(default_factory=dict)  # "90" -> ms


@dataclass
class TrtexecSummary:
    trt_version: str | None = None
    throughput_qps: float | None = None
    total_host_walltime_s: float | None = None
    total_gpu_compute_s: float | None = None
    device: str | None = None
    stats: dict[str, Stats] = field(default_factory=dict)  # latency, enqueue, h2d, gpu_compute, d2h

    @property
    def has_summary(self) -> bool:
        return "gpu_compute" in self.stats

    def to_dict(self) -> dict:
        return asdict(self)


def banner_version(code: str) -> str:
    """``8601`` -> ``8.6.1``; ``100300`` -> ``10.3.0`` (8.x: M*1000 + m*100 + p; 10.x+: M*10000 + m*100 + p)."""
    if len(code) <= 4:
        return f"{code[0]}.{code[1]}.{int(code[2:])}"
    return f"{int(code[:-4])}.{int(code[-4:-2])}.{int(code[-2:])}"


def parse(text: str) -> TrtexecSummary:
    out = TrtexecSummary()
    for raw in text.splitlines():
        line = _PREFIX.sub("", raw).strip()
        if not line or line.startswith("#"):
            continue
        if m := _BANNER.search(line):
            out.trt_version = out.trt_version or banner_version(m.group(1))
            continue
        if m := _VERSION_LINE.search(line):
            out.trt_version = out.trt_version or ".".join(m.groups())
            continue
        if line.startswith("Selected Device:"):
            out.device = line.split(":", 1)[1].strip()
            continue
        if m := re.match(rf"Throughput:\s*({_NUM})\s*qps", line):
            out.throughput_qps = float(m.group(1))
            continue
        if m := re.match(rf"Total Host Walltime:\s*({_NUM})\s*s", line):
            out.total_host_walltime_s = float(m.group(1))
            continue
        if m := re.match(rf"Total GPU Compute Time:\s*({_NUM})\s*s", line):
            out.total_gpu_compute_s = float(m.group(1))
            continue
        for label, key in _METRICS.items():
            if line.startswith(label + ":"):
                out.stats[key] = _stats(line[len(label) + 1 :])
                break
    return out


def _stats(body: str) -> Stats:
    s = Stats()
    for m in _STAT.finditer(body):
        name, pct, value = m.group(1), m.group(2), float(m.group(3))
        if pct is not None:
            s.percentiles[pct.rstrip("0").rstrip(".") if "." in pct else pct] = value
        else:
            setattr(s, name, value)
    return s


MAX_LOG_BYTES = 256 << 20  # a trtexec log with --dumpProfile is a few MiB


def parse_file(path) -> TrtexecSummary:
    """A saved log: a regular file only (a FIFO would block ``--from-log`` forever), bounded in size."""
    from vlmprune.safe_read import read_regular

    return parse(read_regular(path, "log", MAX_LOG_BYTES).decode("utf-8", errors="replace"))
