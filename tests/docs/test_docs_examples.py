"""Every code block of the documentation site (``docs/``) runs, or says why it cannot.

The convention (also in ``docs/README.md``):

* a fenced ``python`` block is executed. The blocks of one page run in order, in one
  namespace and one event loop (top-level ``await`` allowed), like the cells of a
  notebook, in a fresh working folder that holds ``examples/`` (the repo's examples);
* a fenced ``bash`` block is run by ``bash -e`` in that same folder, after the page's
  earlier blocks (so a file a Python block wrote is there);
* a fenced ``toml`` block is a configuration file: it is parsed, and loaded as an
  ``llmbatch.toml`` by :mod:`llmbatch.config` (model and provider profiles, limiter
  settings) and :func:`llmbatch.cache.cache_settings` (the ``[cache]`` table);
* a block preceded by ``<!-- run: pytest -->`` is saved as a test module and run by
  pytest, as a user's own test suite would run it;
* any other block, or one that cannot run offline, is preceded by
  ``<!-- not-run: the reason -->`` (an empty reason is an error).

Everything runs against llmbatch's provider simulator on 127.0.0.1: ``OPENAI_API_KEY``
and ``OPENAI_BASE_URL`` (and the Anthropic pair) point at it, so a block that says
``OpenAIProvider()`` or ``llmbatch run --provider openai`` talks to the simulator exactly
as it would talk to OpenAI. Nothing else leaves the machine.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import gc
import io
import linecache
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llmbatch.cache import cache_settings
from llmbatch.config import limiter_settings, load_profiles, load_providers
from llmbatch.testing import BatchSimConfig, Simulator

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

#: languages run as they are; any other block needs a ``not-run`` marker
RUNNABLE = frozenset({"python", "bash", "toml"})

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)[^\n]*$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<kind>not-run|run)\s*:\s*(?P<what>.*?)\s*-->\s*$")


@dataclass(frozen=True, slots=True)
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None  # "not-run" or "run"
    what: str | None  # the marker's reason, or what to run it with

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def parse_blocks(page: Path, text: str) -> list[Block]:
    """The fenced blocks of *text*, each with the marker comment just above it (only
    blank lines may separate them)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][indent:] if lines[j][:indent].isspace() else lines[j])
            j += 1
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = _MARKER.match(lines[k]) if k >= 0 else None
        blocks.append(
            Block(
                page=page,
                line=i + 1,
                lang=opening["lang"].lower(),
                code="\n".join(body) + "\n",
                marker=marker["kind"] if marker else None,
                what=marker["what"] if marker else None,
            )
        )
        i = j + 1
    return blocks


def doc_pages() -> list[Path]:
    """Every page of the site (``docs/README.md``, for contributors, is not one)."""
    return sorted(p for p in DOCS.rglob("*.md") if p != DOCS / "README.md")


def page_blocks() -> dict[Path, list[Block]]:
    return {page: parse_blocks(page, page.read_text(encoding="utf-8")) for page in doc_pages()}


def problems(block: Block) -> str | None:
    """Why *block* breaks the convention, or None."""
    if block.marker == "not-run":
        return None if block.what else "a not-run marker needs a reason"
    if block.marker == "run":
        if block.what != "pytest" or block.lang != "python":
            return f"unknown run marker {block.what!r} (only python blocks, 'run: pytest')"
        return None
    if block.lang not in RUNNABLE:
        return f"a {block.lang or 'plain'} block must be marked <!-- not-run: reason -->"
    return None


# -- the convention itself -------------------------------------------------------------


def test_the_parser_reads_markers_and_fences() -> None:
    """Blocks, their languages and their markers come out as written."""
    text = (
        "# Page\n\n```python\nx = 1\n```\n\n"
        "<!-- not-run: needs a key -->\n\n```bash\nrm -rf /\n```\n"
        "<!-- run: pytest -->\n```python\ndef test_a(): pass\n```\n\n1. a list:\n\n"
        "    ```toml\n    [run]\n    ```\n"
    )
    blocks = parse_blocks(DOCS / "x.md", text)
    expected = [
        ("python", "x = 1\n", None, None),
        ("bash", "rm -rf /\n", "not-run", "needs a key"),
        ("python", "def test_a(): pass\n", "run", "pytest"),
        ("toml", "[run]\n", None, None),
    ]
    assert expected == [(b.lang, b.code, b.marker, b.what) for b in blocks]
    assert [None, None, None, None] == [problems(b) for b in blocks]
    unmarked = parse_blocks(DOCS / "x.md", "```text\noutput\n```\n")
    assert "must be marked" in (problems(unmarked[0]) or "")
    empty = parse_blocks(DOCS / "x.md", "<!-- not-run: -->\n```bash\nx\n```\n")
    assert "needs a reason" in (problems(empty[0]) or "")


def test_every_block_is_run_or_marked() -> None:
    """No block of the site is silently left out: it runs, or a marker says why not."""
    found = [b for blocks in page_blocks().values() for b in blocks]
    broken = [f"{b.where}: {problems(b)}" for b in found if problems(b)]
    assert [] == broken
    runnable = [b for b in found if b.marker != "not-run"]
    # the site is mostly runnable examples, not prose about code that never runs
    assert len(runnable) >= 30, len(runnable)
    assert len(runnable) > 2 * (len(found) - len(runnable))


# -- running a page ---------------------------------------------------------------------

_SIM_OPTIONS: dict[str, Any] = {
    # headers to learn from, and a Batch API that ends within a second
    "rpm": 6_000,
    "tpm": 4_000_000,
    "itpm": 4_000_000,
    "otpm": 800_000,
    "batch": BatchSimConfig(
        validating_seconds=0.05, seconds_per_request=0.001, finalizing_seconds=0.05
    ),
}


@pytest.fixture
def page_env(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    threaded_simulator_factory: Callable[..., Simulator],
) -> Path:
    """A working folder with ``examples/``, and the providers' environment pointing at
    a simulator (served from its own thread, so blocking code and subprocesses work)."""
    sim = threaded_simulator_factory(**_SIM_OPTIONS)
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    base = sim.base_url.removesuffix("/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-docs-test-0000000000000000")
    monkeypatch.setenv("OPENAI_BASE_URL", f"{base}/v1")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-docs-test-00000000000000")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", base)
    for name in ("LLMBATCH_CONFIG", "LLMBATCH_PROFILES", "LLMBATCH_LIMITER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    return work


def run_python(block: Block, namespace: dict[str, Any], runner: asyncio.Runner) -> str:
    """Execute *block* in *namespace* (top-level await on *runner*'s loop); its stdout."""
    # tracebacks show the page's lines
    linecache.cache[block.where] = (len(block.code), None, block.code.splitlines(True), block.where)
    code = compile(
        block.code, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = eval(code, namespace)  # the block is the documentation's own code
        if asyncio.iscoroutine(result):
            runner.run(result)
    return out.getvalue()


def run_bash(block: Block, work: Path) -> str:
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block.code],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert 0 == done.returncode, f"{block.where} exited {done.returncode}:\n{done.stderr}"
    return done.stdout


def load_toml(block: Block, work: Path) -> None:
    """The block is a valid llmbatch.toml: it parses, and its model and provider
    profiles, limiter settings and cache settings load."""
    tomllib.loads(block.code)
    config = work / "llmbatch.toml"
    config.write_text(block.code, encoding="utf-8")
    try:
        load_profiles(config)
        load_providers(config)
        limiter_settings(config)
        cache_settings(config)
    finally:
        config.unlink()


def run_pytest(blocks: list[Block], work: Path) -> str:
    """The page's pytest blocks as test modules, run by a pytest of their own."""
    files = []
    for n, block in enumerate(blocks):
        path = work / f"test_docs_block_{n}.py"
        path.write_text(block.code, encoding="utf-8")
        files.append(str(path))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    where = ", ".join(b.where for b in blocks)
    assert 0 == done.returncode, f"{where}:\n{done.stdout}\n{done.stderr}"
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed is not None, done.stdout
    return done.stdout


def _pages_with_runnable_blocks() -> list[Any]:
    params = []
    for page, blocks in page_blocks().items():
        if any(b.marker != "not-run" and problems(b) is None for b in blocks):
            params.append(pytest.param(page, id=str(page.relative_to(DOCS))))
    return params


@pytest.mark.slow
@pytest.mark.timeout(240)  # a page runs several CLI commands, each a new process
@pytest.mark.parametrize("page", _pages_with_runnable_blocks())
def test_page_examples_run(page: Path, page_env: Path) -> None:
    """The page's runnable blocks run, in order, against the simulator."""
    blocks = [
        b
        for b in parse_blocks(page, page.read_text(encoding="utf-8"))
        if b.marker != "not-run" and problems(b) is None
    ]
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    with asyncio.Runner() as runner:
        for block in blocks:
            if block.marker == "run":
                continue
            if block.lang == "python":
                run_python(block, namespace, runner)
            elif block.lang == "bash":
                run_bash(block, page_env)
            else:
                load_toml(block, page_env)
        del namespace  # what the page left open is reported here, as this page's leak
        gc.collect()
    tests = [b for b in blocks if b.marker == "run"]
    if tests:
        run_pytest(tests, page_env)


# -- the site builds --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """``mkdocs build --strict`` passes: every page in the nav, every link and every
    reference (docstrings included) resolves, with no network."""
    mkdocs = shutil.which("mkdocs")
    if mkdocs is None:
        pytest.skip("mkdocs is not installed: pip install -e '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    assert 0 == done.returncode, done.stderr
    assert (tmp_path / "site" / "reference" / "limits" / "index.html").exists()
    changelog = (tmp_path / "site" / "changelog" / "index.html").read_text(encoding="utf-8")
    assert "Unreleased" in changelog
