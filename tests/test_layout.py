"""The package's shape: imports written inside functions only for optional dependencies, and every
module in one of the layer packages that the import-linter contract (.importlinter) orders."""

from __future__ import annotations

import ast
import configparser

from conftest import ROOT

# Imported where used, because a user may not have them (or, for ctypes, not on every platform).
OPTIONAL = {"bitsandbytes", "datasets", "pyarrow", "tensorboard", "wandb", "ctypes", "deepspeed", "fastapi",
            "uvicorn", "openai", "matplotlib"}


def modules():
    for path in sorted((ROOT / "rlhflab").rglob("*.py")):
        yield path.relative_to(ROOT), ast.parse(path.read_text(encoding="utf-8"))


def test_imports_inside_functions_are_for_optional_dependencies_only():
    hidden = []
    for path, tree in modules():
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    continue
                hidden += [f"{path}:{node.lineno}: {name}" for name in names if name.split(".")[0] not in OPTIONAL]
    assert not hidden, "imports inside functions (move them to the module's top):\n" + "\n".join(hidden)


def test_every_module_sits_in_a_layer_of_the_contract():
    contract = configparser.ConfigParser()
    contract.read(ROOT / ".importlinter")
    layers = [name.strip() for line in contract["importlinter:contract:layers"]["layers"].split("\n")
              for name in line.split("|") if name.strip()]
    outside = []
    for path, _ in modules():
        dotted = ".".join(path.with_suffix("").parts).removesuffix(".__init__")
        if dotted in ("rlhflab", "rlhflab.__main__"):
            continue
        if not any(dotted == layer or dotted.startswith(layer + ".") for layer in layers):
            outside.append(dotted)
    assert not outside, f"modules in no layer of .importlinter: {outside}"
