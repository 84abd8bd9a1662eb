"""Shared bits for the benchmarks: a header that says what machine measured, medians, tables."""
from __future__ import annotations

import os
import platform
import statistics
import time


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    threads = torch.get_num_threads()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} ({threads} threads), {gpu}, "
            f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M')}")


def header(title: str, what: str) -> None:
    print(f"# {title}\n# measured: {what}\n# machine:  {machine()}\n")


def median(values):
    return statistics.median(values)


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    line = " | ".join(c.ljust(widths[c]) for c in columns)
    out = [line, "-|-".join("-" * widths[c] for c in columns)]
    for r in rows:
        out.append(" | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))
    return "\n".join(out)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return str(v)
