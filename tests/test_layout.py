"""Imports flow one way: cli -> tools, training -> generate, loader -> decoding, convert
-> shipped -> checkpoint -> models -> errors. A module may import its own layer's modules and lower
layers only; this test fails on an import that goes the wrong way (lazy imports inside
functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import specstream_mlx

# Layer of each part of the package; a module may import its own part or a lower layer.
RANKS = {
    "errors": 0, "settings": 1, "jsonl": 1, "blas": 1,
    "models": 2, "checkpoint": 2.5, "shipped": 2.7,
    "decoding": 3, "convert": 3, "matmul_plan": 3,
    "generate": 4, "loader": 4,
    "training": 5, "tools": 5, "serve": 5,
    "cli": 6, "__init__": 7,
}


def part_of(module: str) -> str:
    """'specstream_mlx.decoding.step' -> 'decoding'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["specstream_mlx", *parts])


def imports(path: Path, name: str) -> list[str]:
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append(target)
            if not node.module or node.level and not node.module:
                found += [f"{target}.{a.name}" for a in node.names]
    return [f for f in found if f == "specstream_mlx" or f.startswith("specstream_mlx.")]


def modules() -> dict[str, Path]:
    """Every module of the installed package (models and convert included)."""
    out = {}
    for root in [Path(p) for p in specstream_mlx.__path__]:
        for path in root.rglob("*.py"):
            out[module_name(path, root)] = path
    for sub in ("models", "convert"):
        pkg = __import__(f"specstream_mlx.{sub}", fromlist=["x"])
        root = Path(pkg.__file__).parent
        for path in root.rglob("*.py"):
            out[f"specstream_mlx.{sub}." + ".".join(
                p for p in path.relative_to(root).with_suffix("").parts if p != "__init__"
            ).rstrip(".")] = path
    return {k.rstrip("."): v for k, v in out.items()}


def test_every_part_has_a_rank():
    assert {part_of(m) for m in modules()} <= set(RANKS)


def test_imports_go_one_way():
    wrong = []
    for name, path in sorted(modules().items()):
        mine = part_of(name)
        for target in imports(path, name):
            theirs = part_of(target)
            if target == "specstream_mlx":
                theirs = "__init__"
            if theirs != mine and RANKS[theirs] >= RANKS[mine]:
                wrong.append(f"{name} ({mine}) imports {target} ({theirs})")
    assert not wrong, "\n".join(wrong)
