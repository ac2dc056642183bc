"""One module owns the schema: no other module spells a param-group, state-dict or checkpoint key itself."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning_nodecay
from lightning_nodecay import _schema

PACKAGE = Path(lightning_nodecay.__file__).parent
KEYS = {
    value for name, value in vars(_schema).items() if name.isupper() and isinstance(value, str) and name != "Penalty"
}


def docstrings(tree: ast.AST) -> set[int]:
    """``id()`` of the docstring constants of a module, its classes and functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def spelled_keys(path: Path) -> list[str]:
    """``line: key`` of every string literal in ``path`` that equals a schema key (docstrings aside)."""
    tree = ast.parse(path.read_text())
    skip = docstrings(tree)
    return [
        f"{path.name}:{node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in KEYS and id(node) not in skip
    ]


def test_schema_defines_every_key_once():
    """Test that the schema's keys are distinct strings and include the library's own keys."""
    values = [value for name, value in vars(_schema).items() if name.isupper() and isinstance(value, str)]
    assert len(values) == len(set(values))
    assert {"weight_decay_multiplier", "hook_weight_decay", "weight_decay_penalty", "weight_decay_mask_share"} <= KEYS
    assert set(_schema.DECISION_KEYS) <= KEYS


def test_schema_keys_spelled_nowhere_else():
    """Test that no module but `_schema.py` writes a schema key as a string literal."""
    found = [hit for path in sorted(PACKAGE.glob("*.py")) if path.name != "_schema.py" for hit in spelled_keys(path)]
    assert not found, "use the constants of `lightning_nodecay._schema`:\n" + "\n".join(found)


def test_schema_param_group_type_lists_every_group_key():
    """Test that the typed description of a param group names every param-group key of the schema."""
    group_keys = {
        _schema.PARAMS,
        _schema.NAME,
        _schema.LR,
        _schema.LR_FAMILY,
        _schema.INITIAL_LR,
        *_schema.DECISION_KEYS,
    }
    assert set(_schema.ParamGroup.__annotations__) == group_keys
