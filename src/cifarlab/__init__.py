"""cifarlab: define a CNN, train it from scratch on CIFAR-10, CIFAR-100 or your own photos, evaluate it,
see what it learned.

Notebook use::

    import cifarlab
    data = cifarlab.load_dataset("cifar10")              # or "cifar100", "folder:/path/to/photos"
    print(cifarlab.summary(cifarlab.build_model("exercise")))
    result = cifarlab.train(cifarlab.recipe_from("exercise", epochs=2), data, "runs/notebook")
    ev = cifarlab.evaluate_model(result.model, data.test.images, data.test.labels, data.classes,
                                 result.normalization)
"""
from .version import __version__  # noqa: F401

from .checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from .data import CIFAR10, DATASETS, Dataset, Split, load_cifar10, load_dataset, register_dataset  # noqa: E402
from .errors import CifarlabError  # noqa: E402
from .evaluate import Evaluation, evaluate_model, predict_logits  # noqa: E402
from .models import MODELS, Net, build_model, get_declaration, register_model, summary  # noqa: E402
from .recipes import PRESETS, Recipe, recipe_from  # noqa: E402
from .train import train  # noqa: E402
from .transforms import Normalization  # noqa: E402

__all__ = [
    "Dataset", "CIFAR10", "Split", "DATASETS", "load_dataset", "register_dataset", "load_cifar10", "MODELS", "Net",
    "build_model", "get_declaration", "register_model", "summary", "PRESETS", "Recipe", "recipe_from", "train",
    "Evaluation", "evaluate_model", "predict_logits", "Normalization", "load_checkpoint", "save_checkpoint",
    "CifarlabError", "__version__",
]
