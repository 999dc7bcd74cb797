"""``scripts/provider_matrix.py``: the README's provider matrix is the profiles' own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from llmbatch.config import BUILTIN_PROVIDERS

ROOT = Path(__file__).resolve().parent.parent
START = "<!-- provider-matrix:start -->"
END = "<!-- provider-matrix:end -->"


def generated() -> str:
    """What the script prints."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "provider_matrix.py")],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return done.stdout


def test_the_script_prints_one_row_per_provider_profile() -> None:
    """A header, a rule, and a row per built-in provider, in the profiles' order, each
    with the profile's discount where it has a Batch API."""
    lines = generated().splitlines()
    rows = lines[2:]
    assert "| provider | online | batch | limits source | batch discount |" == lines[0]
    assert [f"`{name}`" for name in BUILTIN_PROVIDERS] == [r.split(" | ")[0][2:] for r in rows]
    discounts = {r.split(" | ")[0][3:-1]: r.rstrip(" |").rsplit(" | ", 1)[1] for r in rows}
    assert ("25%", "50%", "-") == (discounts["groq"], discounts["azure"], discounts["local"])


def matrix_in(readme: str) -> str | None:
    """The table between the markers of *readme* (``None``: no markers)."""
    if START not in readme or END not in readme:
        return None
    return readme.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def test_a_stale_matrix_is_told_apart() -> None:
    """The comparison sees a README whose table is the output, and one that is not."""
    table = generated()
    fresh = f"# x\n\n{START}\n{table}{END}\n"
    stale = fresh.replace("| 25% |", "| 50% |")
    assert (table, True) == (matrix_in(fresh), matrix_in(stale) != table)


def test_the_readme_matrix_is_the_generated_one() -> None:
    """The README's table between the markers is exactly the script's output."""
    found = matrix_in((ROOT / "README.md").read_text(encoding="utf-8"))
    assert generated() == found
