"""Does the callback loop cost training speed? The same recipe through two versions of cifarlab, paired.

Each version is a git commit checked out as a worktree (``--before``, default: the last commit with the
one-class loop; ``--after``: this checkout). Rounds alternate before/after, each a fresh process that
trains ``--steps`` optimizer steps of the recipe on the real CIFAR-10 training set with a fixed thread
count. Throughput is timed by an optimizer step post-hook (the same hook in both versions): images per
second over the steps after ``--warmup``; setup, folder writes and the last checkpoint are excluded.
Reports each round, the median per version and the after/before ratio of medians.

    python bench/bench_loop_overhead.py --data-dir ../shared/cifar-10-batches-bin --rounds 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "dde5825"  # the last commit whose train.py is the one-class loop (_Run)

DRIVER = r"""
import json, sys, tempfile, time
import torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from torch.optim.optimizer import register_optimizer_step_post_hook
from cifarlab.data import load_cifar10
from cifarlab.train import recipe_from, train
stamps = []
register_optimizer_step_post_hook(lambda *a: stamps.append(time.perf_counter()))
data = load_cifar10(args["data_dir"], download=False)
recipe = recipe_from(args["preset"])
with tempfile.TemporaryDirectory() as tmp:
    result = train(recipe, data, tmp + "/run", progress=False, log=lambda *a: None, max_steps=args["steps"])
if args.get("weights"):  # for --check-same: the weights after these steps
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, args["weights"])
w = args["warmup"]
import cifarlab
print(json.dumps({"img_per_s": (len(stamps) - 1 - w) * recipe.batch_size / (stamps[-1] - stamps[w]),
                  "module": cifarlab.__file__}))
"""


def worktree(commit: str) -> Path:
    path = Path(tempfile.gettempdir()) / f"cifarlab-{commit}"
    if not path.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit], check=True,
                       capture_output=True)
    return path


def run_once(src: Path, args, weights: str = "") -> float:
    spec = {"data_dir": args.data_dir, "preset": args.preset, "steps": args.steps, "warmup": args.warmup,
            "threads": args.threads, "weights": weights}
    out = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(spec)], capture_output=True, text=True,
                         env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": str(args.threads)})
    if out.returncode:
        raise SystemExit(f"{src}: {out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["module"].startswith(str(src)), (result["module"], src)  # the version asked for ran
    return result["img_per_s"]


def check_same(versions: dict, args) -> None:
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        for name, src in versions.items():
            run_once(src, args, weights=f"{tmp}/{name}.safetensors")
        before, after = (load_file(f"{tmp}/{name}.safetensors") for name in versions)
    differing = [k for k in before if not torch_equal(before[k], after[k])]
    print(f"weights after {args.steps} steps, before vs after: "
          f"{'bitwise identical' if not differing and before.keys() == after.keys() else f'DIFFER in {differing}'}")


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--before", default=BEFORE)
    ap.add_argument("--preset", default="exercise")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check-same", action="store_true",
                    help="first, one run of each version: are the weights after --steps steps bitwise equal?")
    args = ap.parse_args()
    args.data_dir = str(Path(args.data_dir).resolve())
    versions = {"before": worktree(args.before) / "src", "after": ROOT / "src"}
    header(f"Loop overhead: {args.preset} recipe, before ({args.before}) vs after (this checkout)",
           f"images/s over steps {args.warmup + 1}..{args.steps} of batch training on CIFAR-10, "
           f"{args.threads} fixed threads, precision auto, {args.rounds} alternating rounds")
    if args.check_same:
        check_same(versions, args)
    rows, rates = [], {"before": [], "after": []}
    for r in range(args.rounds):
        for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
            rate = run_once(versions[name], args)
            rates[name].append(rate)
            rows.append({"round": r + 1, "version": name, "img/s": round(rate)})
            print(f"round {r + 1} {name}: {rate:.0f} img/s", flush=True)
    print()
    print(table(rows, ["round", "version", "img/s"]))
    before, after = statistics.median(rates["before"]), statistics.median(rates["after"])
    print(f"\nmedian before {before:.0f} img/s, after {after:.0f} img/s: after / before = {after / before:.3f}")


if __name__ == "__main__":
    main()
