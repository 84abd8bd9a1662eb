"""``cifarlab augment-preview``: a PNG of what a recipe's augmentation (flips, translation, cutout, MixUp,
CutMix) really feeds the net."""
from __future__ import annotations

from .args import add_data_args, add_preset_and_recipe_args, bounded_int, load_data, recipe_from_args


def register(sub) -> None:
    p = sub.add_parser("augment-preview", help="a PNG of training images beside what the recipe's augmentation "
                                               "feeds the net",
                       description="Takes the first --n images of the recipe's first epoch and runs them --views "
                                   "times through the training batch path (normalization, flip, translate, "
                                   "cutout, MixUp/CutMix with the other images as partners), de-normalized back "
                                   "to pixels; each image is titled with its (soft) label. Trains nothing. "
                                   "--seed seeds the image order and the random draws.")
    add_preset_and_recipe_args(p, "recipe (defaults come from --preset; only its augmentation options matter here)")
    o = p.add_argument_group("preview")
    o.add_argument("--n", type=bounded_int(1, 64), default=8, help="images, one per row (default: 8)")
    o.add_argument("--views", type=bounded_int(1, 16), default=4, help="augmented views of each (default: 4)")
    o.add_argument("--out", default="augment_preview.png", help="the PNG (default: augment_preview.png)")
    o.add_argument("--no-progress", action="store_true", help="no download progress bar")
    add_data_args(p)
    p.set_defaults(func=augment_preview_command)


def augment_preview_command(args) -> int:
    from ..augment_preview import preview, render

    recipe = recipe_from_args(args)
    data = load_data(args)
    print(render(preview(recipe, data, n=args.n, views=args.views, seed=recipe.seed), args.out))
    return 0
