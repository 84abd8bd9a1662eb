"""``cifarlab compare RUN1 RUN2 ...``: one table, the recipe differences and one curves plot."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("compare", help="runs side by side: accuracy, ECE, time, parameters, recipe differences, "
                                       "curves")
    p.add_argument("runs", nargs="+", metavar="RUN", help="two or more run folders")
    p.add_argument("--out", default="compare", metavar="DIR",
                   help="folder for compare.csv and curves.png (default: ./compare)")
    p.add_argument("--html", action="store_true", help="also write compare.html (self-contained)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..compare import compare

    files = compare(args.runs, args.out, html=args.html)
    print(f"\nwritten: {', '.join(str(f) for f in files.values())}")
    return 0
