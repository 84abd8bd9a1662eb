"""``cifarlab import-keras WEIGHTS.h5``: the exercise's Keras weights as a cifarlab checkpoint."""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError


def register(sub) -> None:
    from ..keras_import import FC1_ACTIVATIONS

    p = sub.add_parser("import-keras", help="turn the exercise's Keras weights (.h5) into a cifarlab checkpoint",
                       description="Import weights saved by Keras 2 model.save_weights('weights.h5') or Keras 3 "
                                   "model.save_weights('x.weights.h5') (or a .keras archive) for the exercise's "
                                   "model. Read with h5py; TensorFlow is not needed.")
    p.add_argument("weights", help="the .h5 / .weights.h5 / .keras file")
    p.add_argument("--out", help="run folder to create (default: runs/keras-<file name>); the checkpoint goes "
                                 "into OUT/final")
    p.add_argument("--fc1-activation", choices=FC1_ACTIVATIONS, default="none",
                   help="activation after fc1 in the Keras model: none (the exercise's reference model, "
                        "default) or leaky_relu (LeakyReLU(0.1), as the built-in 'exercise' declaration)")
    p.add_argument("--force", action="store_true", help="replace OUT/final if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoints import save_checkpoint
    from ..keras_import import import_keras
    from ..models import summary

    weights = Path(args.weights)
    out = Path(args.out) if args.out else Path("runs") / f"keras-{weights.name.split('.')[0] or 'model'}"
    from ..rundir import RunLock

    if (out / "final").exists() and not args.force:
        raise CheckpointError(f"{out / 'final'} already exists; pass --force to replace it or choose another --out.")
    model, meta = import_keras(weights, args.fc1_activation)
    with RunLock(out):  # never into a folder a training is writing
        if (out / "final").exists() and not args.force:
            raise CheckpointError(f"{out / 'final'} already exists; pass --force to replace it or choose another "
                                  f"--out.")
        folder = save_checkpoint(out / "final", model, meta)
    print(summary(model))
    print(f"imported {len(meta['source']['layers'])} layers from {weights} ({meta['source']['layout']}): "
          + ", ".join(f"{k} <- {v}" for k, v in meta["source"]["layers"].items()))
    print(f"checkpoint: {folder}\nevaluate it with: cifarlab evaluate {out}")
    return 0
