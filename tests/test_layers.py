"""The layering of the package: the pure-PyTorch core never imports Lightning, directly or through the package."""

import ast
from pathlib import Path

import pytest

import lightning_nodecay

PACKAGE = Path(lightning_nodecay.__file__).parent
CORE = (
    "rules",
    "_patterns",
    "_verdicts",
    "groups",
    "summary",
    "_safety_net",
    "hook",
    "_semantics",
    "_hook_checks",
    "_kernels",
    "_layout",
    "_remap",
    "norms",
    "plot",
    "_log",
    "_naming",
    "_schema",
    "_invariant",
    "_layer_ids",
    "_schedules",
    "_shards",
)
GLUE = ("_lightning", "_lifecycle", "_checkpoint", "mixin", "monitor", "finetuning", "schedule")
LIGHTNING = ("pytorch_lightning", "lightning", "lightning_fabric")


def imported(module: str) -> set[str]:
    """Every module named by an `import` statement of ``lightning_nodecay/<module>.py``, at any depth."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_no_lightning(module):
    """Test that a core module imports neither a Lightning namespace nor a package module that is not core."""
    names = imported(module)
    assert not {name for name in names if name.split(".")[0] in LIGHTNING}
    package = {name.removeprefix("lightning_nodecay.") for name in names if name.startswith("lightning_nodecay.")}
    assert package <= set(CORE), package - set(CORE)


def test_every_module_is_core_or_glue():
    """Test that every module of the package is listed as core or as glue, so a new one gets the check above."""
    modules = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(CORE) | set(GLUE)
    assert not set(CORE) & set(GLUE)
