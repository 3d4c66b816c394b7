"""Code shape (design.md §4): no function or method in ``wanx/`` is longer than 60 lines.

Length runs from the ``def`` line to the last line of the body, docstring included (decorators
not counted); a nested function counts inside its parent and on its own.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

import wanx

MAX_LINES = 60
PACKAGE = Path(wanx.__file__).resolve().parent


def long_functions(root: Path, limit: int = MAX_LINES) -> Iterator[tuple[Path, int, str, int]]:
    """(file, def line, name, length) of every function under ``root`` longer than ``limit`` lines."""
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    yield path, node.lineno, node.name, length


def test_the_counter_measures_from_def_to_the_last_body_line(tmp_path):
    body = "    x = 1\n" * 58
    (tmp_path / "m.py").write_text(f'@staticmethod\ndef fits():\n    """Doc."""\n{body}\n\n'
                                   f'def too_long():\n    """Doc."""\n{body}    return x\n')
    found = list(long_functions(tmp_path))
    assert [(line, name, length) for _, line, name, length in found] == [(64, "too_long", 61)]


def test_no_function_in_wanx_is_longer_than_60_lines():
    offenders = list(long_functions(PACKAGE))
    report = "\n".join(f"{path.relative_to(PACKAGE.parent)}:{line} {name}() is {length} lines"
                       for path, line, name, length in offenders)
    print(report)
    assert not offenders, f"functions over {MAX_LINES} lines:\n{report}"
