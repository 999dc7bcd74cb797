"""Tables of the documentation site that are copies of what the code says: each stays
equal to its source.

* ``docs/guides/providers.md``: the provider matrix, as ``scripts/provider_matrix.py``
  prints it from :data:`llmbatch.config.BUILTIN_PROVIDERS` (the README holds the same);
* ``docs/guides/metrics.md``: the figures, one row per :data:`llmbatch.metrics.FIGURES`
  entry, with its OpenTelemetry and Prometheus names and its kind.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from llmbatch.metrics import FIGURES

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def between(text: str, name: str) -> str | None:
    """The lines between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` (``None``:
    no such markers)."""
    found = re.search(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", text, re.S)
    return found[1] if found else None


def provider_matrix() -> str:
    """What ``python scripts/provider_matrix.py`` prints."""
    spec = importlib.util.spec_from_file_location(
        "provider_matrix", ROOT / "scripts" / "provider_matrix.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rendered = module.render()
    assert isinstance(rendered, str)
    return rendered


def test_between_reads_the_marked_lines_only() -> None:
    text = "a\n<!-- t:start -->\n| x |\n<!-- t:end -->\nb\n"
    assert "| x |\n" == between(text, "t")
    assert between(text, "other") is None


def test_the_providers_page_matrix_is_the_generated_one() -> None:
    """The provider guide's matrix is exactly the script's output."""
    page = (DOCS / "guides" / "providers.md").read_text(encoding="utf-8")
    assert provider_matrix() == between(page, "provider-matrix")


def test_the_metrics_page_lists_every_figure_by_its_names() -> None:
    """One row per figure, in FIGURES' order, with its OpenTelemetry name, its
    Prometheus name (``_total`` for counters, as the exposition shows them), its kind
    and its description."""
    page = (DOCS / "guides" / "metrics.md").read_text(encoding="utf-8")
    table = between(page, "figures")
    assert table is not None
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]
    ]
    expected = [
        [
            f"`{figure.otel_name}`",
            f"`{figure.prometheus_name}{'_total' if figure.kind == 'counter' else ''}`",
            figure.kind,
            figure.description,
        ]
        for figure in FIGURES.values()
    ]
    assert expected == [[row[0], row[1], row[2], row[4]] for row in rows]
