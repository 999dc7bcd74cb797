"""The wheel ships what the code and type checkers need: ``py.typed`` and every file of
the ``llmbatch`` source tree (the data files the code loads included)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llmbatch"


def _source_files() -> list[str]:
    """Every file of the package's source tree, as a wheel names it
    (``llmbatch/limits/x.lua``); bytecode caches left out."""
    return sorted(
        path.relative_to(ROOT).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file()
        and "__pycache__" not in path.parts
        and path.suffix not in {".pyc", ".pyo"}
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    """The wheel built from this source tree, offline (hatchling from the environment)."""
    if importlib.util.find_spec("hatchling") is None:
        pytest.fail("hatchling is not installed: run scripts/install (the dev extra has it)")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "--quiet",
            "--wheel-dir",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    [built] = out.glob("llmbatch-*.whl")
    with zipfile.ZipFile(built) as archive:
        yield archive


def test_the_walk_sees_the_data_files() -> None:
    """The source walk finds files that are not Python (it is not vacuous)."""
    assert "llmbatch/py.typed" in _source_files()


def test_wheel_ships_py_typed_as_its_classifier_promises(wheel: zipfile.ZipFile) -> None:
    """``llmbatch/py.typed`` is in the wheel, so type checkers read llmbatch's
    annotations in users' code, as the "Typing :: Typed" classifier says."""
    names = wheel.namelist()
    assert "llmbatch/py.typed" in names
    [metadata] = [name for name in names if name.endswith(".dist-info/METADATA")]
    assert "Classifier: Typing :: Typed" in wheel.read(metadata).decode().splitlines()


def test_wheel_ships_every_file_of_the_source_tree(wheel: zipfile.ZipFile) -> None:
    """Every file under ``llmbatch/`` (modules and the data files the code loads, such as
    Lua scripts) is in the wheel."""
    assert [] == sorted(set(_source_files()) - set(wheel.namelist()))
