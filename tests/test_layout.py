"""The package's shape: data flows one way, so no import cycle; the CLI sits on top, so no library module
imports it. Read from the source with ast (nothing is imported)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cifarlab"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from . import x`` counts as submodule x when it exists)."""
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: set() for m in files}
    for mod, path in files.items():
        base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                anchor = base[: len(base) - node.level + 1] if node.level else []
                target = ".".join(anchor + ([node.module] if node.module else []))
                names = [f"{target}.{a.name}" for a in node.names]
                targets = [n if n in files else target for n in names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                while t not in files and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in files and t != mod:
                    graph[mod].add(t)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "cifarlab.data.cifar10" in graph["cifarlab.data"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_no_library_module_imports_the_cli():
    def is_cli(m: str) -> bool:
        return m == "cifarlab.cli" or m.startswith("cifarlab.cli.") or m == "cifarlab.__main__"

    offenders = {m: sorted(t for t in targets if is_cli(t)) for m, targets in import_graph().items() if not is_cli(m)}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_each_command_is_one_module_in_the_cli_package():
    from cifarlab import cli

    names = {c.__name__.rsplit(".", 1)[1] for c in cli.COMMANDS}
    assert names <= {p.stem for p in (PACKAGE / "cli").glob("*.py")}
    parser = cli.build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # noqa: SLF001 (argparse keeps them there)
    assert {"run", "train", "evaluate", "visualize", "report", "predict", "export", "import-keras", "summary",
            "models", "data"} <= commands


def test_training_options_come_from_the_recipe_fields():
    """One source for choices and limits: every Recipe field is an option with the field's own bounds."""
    from dataclasses import fields

    from cifarlab.cli import build_parser
    from cifarlab.recipes import Recipe

    train = build_parser()._subparsers._group_actions[0].choices["train"]  # noqa: SLF001
    flags = {s for a in train._actions for s in a.option_strings}  # noqa: SLF001
    for f in fields(Recipe):
        assert "--" + f.name.replace("_", "-") in flags, f.name
    lo, hi = Recipe.__dataclass_fields__["epochs"].metadata["bounds"]
    assert (lo, hi) == (1, 10_000)
