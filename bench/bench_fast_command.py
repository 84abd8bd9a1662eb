"""The fast preset's whole command, paired with a plain eager PyTorch yardstick (same machine, alternating).

Each round runs every variant once as a fresh process, in a rotated order (so slow drift of the machine
hits each variant alike), and times the whole process from start to exit (imports, data loading and its
checks, training, the end-of-run evaluation, writing the run folder). The table shows the median over
rounds, the spread (min-max) and the ratio of medians to the yardstick (``bench/yardstick_fast.py``: the same
net, data and amount of training in a plain loop, no checks, no run folder).

    python bench/bench_fast_command.py --data-dir ../shared/cifar-10-batches-bin --rounds 3
    python bench/bench_fast_command.py ... --variants yardstick default threads2 --rounds 5

Variants: ``yardstick``; ``default`` (``cifarlab train --preset fast``: adaptive threads); ``threads2``
(``--threads 2``); ``threads1`` (``--threads 1``). Run it on a quiet machine: one competing process cuts
throughput to a third.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def commands(data_dir: str, runs: Path, tag: str) -> dict[str, list[str]]:
    cifarlab = [sys.executable, "-m", "cifarlab", "train", "--preset", "fast", "--data-dir", data_dir,
                "--runs-dir", str(runs), "--no-progress"]
    return {"yardstick": [sys.executable, str(HERE / "yardstick_fast.py"), "--data-dir", data_dir, "--threads", "2"],
            "default": [*cifarlab, "--name", f"default-{tag}"],
            "threads2": [*cifarlab, "--name", f"threads2-{tag}", "--threads", "2"],
            "threads1": [*cifarlab, "--name", f"threads1-{tag}", "--threads", "1"]}


# the yardstick's last line, or cifarlab's last validation line (validation on the test set, as the exercise)
ACCURACY = re.compile(r"(?:yardstick: acc ([0-9.]+))|(?:validation accuracy ([0-9.]+)% at epoch)")


def run_once(cmd: list[str]) -> tuple[float, float | None, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seconds = time.perf_counter() - start
    out = done.stdout + done.stderr
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{out[-3000:]}")
    found = ACCURACY.findall(out)
    acc = None
    if found:
        a, b = found[-1]
        acc = float(a) * 100 if a else float(b)
    return seconds, acc, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["yardstick", "default", "threads2"])
    ap.add_argument("--keep-log", type=Path, help="append every process's output to this file")
    args = ap.parse_args()
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    accs: dict[str, list[float]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = args.variants[r % len(args.variants):] + args.variants[:r % len(args.variants)]
            for v in order:
                seconds, acc, out = run_once(commands(args.data_dir, Path(tmp), f"r{r}")[v])
                times[v].append(seconds)
                if acc is not None:
                    accs[v].append(acc)
                print(f"round {r + 1}: {v:<10} {seconds:7.1f} s  acc {acc if acc is not None else 'n/a'}", flush=True)
                if args.keep_log:
                    with open(args.keep_log, "a") as f:
                        f.write(f"==== round {r + 1} {v} {seconds:.1f} s\n{out}\n")
    base = statistics.median(times["yardstick"]) if "yardstick" in times else None
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"\n# fast preset, whole command; {args.rounds} rounds, alternating; {cpu}, {os.cpu_count()} cores; "
          f"bf16 autocast (cifarlab's CPU default and the yardstick's)")
    print(f"{'variant':<10} {'median s':>9} {'min-max s':>15} {'x yardstick':>12} {'test acc % (median)':>20}")
    for v in args.variants:
        t = times[v]
        ratio = f"{statistics.median(t) / base:.2f}x" if base else "n/a"
        acc = f"{statistics.median(accs[v]):.2f}" if accs[v] else "n/a"
        print(f"{v:<10} {statistics.median(t):>9.1f} {min(t):>7.1f}-{max(t):<7.1f} {ratio:>12} {acc:>20}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
