"""Imports flow one way: settings, steps and the pure core sit below the database, ingest
and the pipeline, and the shared vocabulary sits below everything (STYLE.md, section 2).

Every import statement of a module counts, including those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import autowisp

PACKAGE = Path(autowisp.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str, *, module: str, is_package: bool = False) -> list[str]:
    """Dotted names a module's source imports: ``from a.b import c`` gives ``a.b.c``.

    Relative imports are resolved against ``module`` (a package when ``is_package``).
    """
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")
                anchor = package[: len(package) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            names.extend(base if a.name == "*" else f"{base}.{a.name}" for a in node.names)
    return names


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _offenders(paths: list[Path], *, forbidden=(), allowed_autowisp=None) -> list[str]:
    """``module: import`` for each import of a forbidden package, or, with
    ``allowed_autowisp``, of any ``autowisp`` module outside the allowed ones."""
    found = []
    for path in paths:
        module = _module_name(path)
        names = imported_names(
            path.read_text(), module=module, is_package=path.name == "__init__.py"
        )
        for name in names:
            bad = any(_within(name, prefix) for prefix in forbidden)
            if allowed_autowisp is not None and _within(name, "autowisp"):
                bad = bad or not any(_within(name, prefix) for prefix in allowed_autowisp)
            if bad:
                found.append(f"{module}: {name}")
    return found


def _files(pattern: str) -> list[Path]:
    paths = sorted(PACKAGE.glob(pattern))
    assert paths, f"no file matches autowisp/{pattern}"
    return paths


def test_settings_know_nothing_of_pipeline_steps_or_database():
    offenders = _offenders(
        _files("config.py"),
        forbidden=("autowisp.pipeline", "autowisp.steps", "autowisp.db"),
    )
    assert not offenders, offenders


def test_steps_import_no_database_ingest_or_pipeline():
    offenders = _offenders(
        _files("steps/**/*.py"),
        forbidden=("autowisp.db", "autowisp.ingest", "autowisp.pipeline"),
    )
    assert not offenders, offenders


@pytest.mark.parametrize("pattern", ["core/**/*.py", "vocabulary.py"])
def test_core_and_vocabulary_import_only_core_vocabulary_and_errors(pattern):
    offenders = _offenders(
        _files(pattern),
        allowed_autowisp=("autowisp.core", "autowisp.vocabulary", "autowisp.errors"),
    )
    assert not offenders, offenders


def test_the_scanner_sees_every_form_of_import():
    source = (
        "import autowisp.db.models\n"
        "from autowisp import pipeline\n"
        "from ..ingest.classify import header_pointing\n"
        "def f():\n"
        "    from autowisp.steps.registry import Registry\n"
    )
    names = imported_names(source, module="autowisp.steps.astrometry")
    assert names == [
        "autowisp.db.models",
        "autowisp.pipeline",
        "autowisp.ingest.classify.header_pointing",
        "autowisp.steps.registry.Registry",
    ]
    assert imported_names("from . import base", module="autowisp.steps", is_package=True) == [
        "autowisp.steps.base"
    ]
