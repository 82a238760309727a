"""The pure core imports only numerical libraries (house rule 1)."""

import ast
from pathlib import Path

import autowisp.core

ALLOWED = {
    "numpy",
    "scipy",
    "astropy",
    "numba",
    "sep",
    "math",
    "dataclasses",
    "functools",
    "typing",
    "collections",
    "__future__",
    "enum",
    "itertools",
    "abc",
    "re",  # the magnitude-fit expression's parser
    "erfa",  # astropy's IAU routines (precession, sidereal time)
}


def test_core_imports_only_numerics():
    root = Path(autowisp.core.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == "autowisp" and name.startswith("autowisp.core"):
                    continue
                if top not in ALLOWED:
                    offenders.append(f"{path.name}: {name}")
    assert not offenders, offenders
