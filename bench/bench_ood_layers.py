"""Which features make the best "unlike any class" flag? KNN on the penultimate layer vs KNN on every layer.

For a trained run: global-average-pooled features of every stimulus target (each conv layer's or block's
output after its activation) plus the penultimate features, each L2-normalised; the bank is the run's own
bank split of its training images and the threshold (5th percentile, as cifarlab.ood does) comes from the
held-out images not in the bank. Variants:

* ``penultimate``: cifarlab's KNN score today (Sun et al. 2022);
* ``layer:NAME``: the same on one layer's pooled features;
* ``concat``: all layers' normalised features concatenated (equal weight), then normalised;
* ``min-z``: each layer's KNN score standardised by its held-out mean and sd, the minimum over layers (the
  most unusual layer decides).

Prints AUROC (CIFAR-10 test = positive) against Gaussian noise, pixel-permuted test images and a photo folder,
the share of the photos flagged and the share of test images accepted at each variant's threshold.

    python bench/bench_ood_layers.py RUN --photos ../shared/photos/hymenoptera_data
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from cifarlab import ood
from cifarlab.checkpoints import load_checkpoint
from cifarlab.data import load_stored
from cifarlab.net_layers import find_layer, stimulus_targets
from cifarlab.transforms import Normalization


def pool(out: torch.Tensor, how: str) -> torch.Tensor:
    out = out.detach().float()
    if how == "meanstd":  # the channel's mean and its spread over space (texture statistics)
        return torch.cat([out.mean((2, 3)), out.std((2, 3))], 1)
    return out.mean((2, 3))


def pooled_features(model, images, normalization, names, batch_size=256, how="mean") -> dict[str, torch.Tensor]:
    """{layer: (N, C) spatial means (or means and sds)} and {"penultimate": head input}, eval mode, fp32."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [find_layer(model, n).register_forward_hook(
        lambda m, a, out, n=n: seen.__setitem__(n, pool(out, how))) for n in names]
    head = find_layer(model, ood.head_layer(model))
    hooks.append(head.register_forward_pre_hook(lambda m, a: seen.__setitem__("penultimate", a[0].detach().float().flatten(1))))
    out: dict[str, list] = {n: [] for n in [*names, "penultimate"]}
    model.eval()
    try:
        with torch.inference_mode():
            for s in range(0, len(images), batch_size):
                model(normalization(images[s:s + batch_size]).contiguous(memory_format=torch.channels_last))
                for n in out:
                    out[n].append(seen[n])
    finally:
        for h in hooks:
            h.remove()
    return {n: ood.normalize_rows(torch.cat(v)) for n, v in out.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--photos", required=True)
    p.add_argument("--k", type=int, default=ood.DEFAULT_K)
    p.add_argument("--pool", choices=("mean", "meanstd"), default="mean")
    p.add_argument("--bank-size", type=int, default=0, help="a seeded random subset of the bank (0: all)")
    p.add_argument("--only-min-z", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    ckpt = load_checkpoint(args.run)
    data = load_stored(ckpt.meta["dataset"], log=lambda *a, **k: None)
    norm = Normalization.from_dict(ckpt.meta["normalization"])
    model = ckpt.model.eval()
    names = [t.name for t in stimulus_targets(model) if t.spatial]
    train = ood.training_images(ckpt, data)
    bank_idx, hold_idx, _ = ood.bank_split(ckpt, len(train))
    if args.bank_size:
        g = torch.Generator().manual_seed(0)
        bank_idx = bank_idx[torch.randperm(len(bank_idx), generator=g)[:args.bank_size]]
    log = lambda *a, **k: None  # noqa: E731
    sets = {"noise": ood.load_ood_set("noise", ckpt, data)[2], "permuted": ood.load_ood_set("permuted", ckpt, data)[2],
            "photos": ood.load_ood_set(args.photos, ckpt, data, log=log)[2]}
    feats = {"train": pooled_features(model, train.images, norm, names, how=args.pool),
             "test": pooled_features(model, data.test.images, norm, names, how=args.pool)}
    for name, images in sets.items():
        feats[name] = pooled_features(model, images, norm, names, how=args.pool)

    def knn(layer_of, which):
        bank = layer_of(feats["train"])[bank_idx]
        return ood.knn_scores(layer_of(feats[which]) if which != "hold" else layer_of(feats["train"])[hold_idx],
                              bank, args.k)

    variants = {"penultimate": lambda f: f["penultimate"]}
    variants.update({f"layer:{n}": (lambda f, n=n: f[n]) for n in names})
    layers = [*names, "penultimate"]
    variants["concat"] = lambda f: ood.normalize_rows(torch.cat([f[n] for n in layers], 1))
    rows = []
    for variant, layer_of in ({} if args.only_min_z else variants).items():
        scores = {w: knn(layer_of, w) for w in ("hold", "test", *sets)}
        rows.append((variant, scores))
    # min-z over the per-layer KNN scores (standardised on the held-out images)
    per_layer = {n: {w: knn(lambda f, n=n: f[n], w) for w in ("hold", "test", *sets)} for n in layers}
    minz = {}
    for w in ("hold", "test", *sets):
        z = [(per_layer[n][w] - per_layer[n]["hold"].mean()) / (per_layer[n]["hold"].std() + 1e-12) for n in layers]
        minz[w] = np.min(np.stack(z), 0)
    rows.append(("min-z", minz))

    print(f"# {args.run}: {len(bank_idx)} bank images, {len(hold_idx)} held out; k = {args.k}; pooling {args.pool}")
    print(f"# layers: {', '.join(layers)}")
    print(f"{'variant':<22} {'AUROC noise':>11} {'permuted':>9} {'photos':>7} {'photos flagged':>15} "
          f"{'test accepted':>14}")
    for variant, s in rows:
        t = ood.fit_threshold(s["hold"])
        print(f"{variant:<22} {ood.auroc(s['test'], s['noise']):>11.4f} {ood.auroc(s['test'], s['permuted']):>9.4f} "
              f"{ood.auroc(s['test'], s['photos']):>7.4f} {100 * (s['photos'] < t).mean():>14.1f}% "
              f"{100 * (s['test'] >= t).mean():>13.1f}%")
    print(f"# {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
