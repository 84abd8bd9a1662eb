"""Seconds per attribution method, for deletion/insertion curves and for the sanity check, on real
CIFAR-10 test images with the exercise net (untrained unless --checkpoint: speed does not depend on
the weights). Usage: CIFARLAB_DATA=... python bench/attribution_timing.py [--n 500] [--sanity-n 50]"""
from __future__ import annotations

import argparse
import json
import time

import torch

import cifarlab
from cifarlab.explain import methods as attr
from cifarlab.explain import faithfulness as fa
from cifarlab.transforms import Normalization


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--sanity-n", type=int, default=50)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--methods", nargs="*", default=list(attr.METHODS))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = cifarlab.build_model("exercise")
    norm = Normalization.named("exercise")
    data = cifarlab.load_cifar10()
    images, labels = data.test.images[:args.n], data.test.labels[:args.n]
    out = {"n": args.n, "threads": torch.get_num_threads(), "maps_s": {}}
    maps = {}
    for m in args.methods:
        a = attr.attribute(m, model, images, norm, target="true", labels=labels)
        maps[m] = a
        out["maps_s"][m] = round(a.seconds, 2)
        print(m, "maps", round(a.seconds, 2), flush=True)
    start = time.perf_counter()
    table = fa.faithfulness_table(model, images, labels, norm, methods=args.methods, steps=args.steps, maps=maps)
    out["faithfulness_total_s"] = round(time.perf_counter() - start, 2)
    out["curves_s"] = {m: round(r["seconds_curves"], 2) for m, r in table["methods"].items()}
    out["curves_s"]["random"] = round(table["random"]["seconds_curves"], 2)
    out["auc"] = {m: (round(r["deletion_auc"], 4), round(r["insertion_auc"], 4)) for m, r in table["methods"].items()}
    out["auc"]["random"] = (round(table["random"]["deletion_auc"], 4), round(table["random"]["insertion_auc"], 4))
    print(json.dumps(out), flush=True)
    start = time.perf_counter()
    sanity = fa.cascading_randomization(model, images[:args.sanity_n], norm, methods=args.methods,
                                        targets=labels[:args.sanity_n])
    out["sanity_total_s"] = round(time.perf_counter() - start, 2)
    out["sanity_s"] = {m: round(r["seconds"], 2) for m, r in sanity["methods"].items()}
    out["sanity_final"] = {m: round(r["final"], 3) for m, r in sanity["methods"].items()}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
