"""Deterministic response bodies shared by the simulator's online and batch endpoints.

Every response is a pure function of its request: the completion text starts with
``[<tag>]`` where ``tag`` is :func:`content_tag` of the last user message, so a test can
prove which input an output belongs to, and the same request always gets the same answer.
The completion length is derived from the same hash and never exceeds ``max_tokens``.

What the model writes is an :class:`Output`: :func:`text_output` for plain text, or
:func:`llmbatch.testing._structured.plan_output` for JSON answers and tool calls; the
body builders here wrap it in each provider's response object.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmbatch.testing._cache import CacheUse

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "Output",
    "anthropic_message",
    "anthropic_usage",
    "completion_plan",
    "content_tag",
    "embeddings_response",
    "estimate_tokens",
    "last_user_text",
    "openai_chat_completion",
    "openai_usage",
    "tagged_words",
    "text_of",
    "text_output",
    "tool_use_id",
]

#: what the simulator charges (and caps a completion at) when a request sets no max_tokens
DEFAULT_MAX_TOKENS = 4096
_WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
]


def content_tag(text: str) -> str:
    """The 8-hex-digit tag that marks a response as belonging to *text*."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class Output:
    """What the simulated model writes for one request (one choice).

    Args:
        text: the completion text (for a tool call: its input as JSON).
        tokens: the output tokens it costs.
        truncated: whether ``max_tokens`` cut it short.
        tool: for a tool call, ``{"name": ..., "input": {...}}``; else None.
        outcome: for a JSON answer, ``"valid"``, ``"invalid_json"``,
            ``"schema_violation"`` or ``"truncated"``; None for plain text.
        follow_up: whether the request continues a conversation after an answer
            (an assistant turn followed by a user turn), as a re-ask does.
        refusal: the model declined (a scripted ``Fault(kind="refusal")``): *text* is
            the refusal message, sent as OpenAI's ``message.refusal`` (``content:
            null``) or as Anthropic's text with ``stop_reason: "refusal"``.
    """

    text: str
    tokens: int
    truncated: bool
    tool: Mapping[str, Any] | None = None
    outcome: str | None = None
    follow_up: bool = False
    refusal: bool = False


def text_of(content: Any) -> str:
    """Flatten OpenAI/Anthropic message content (a string or a list of parts) to text."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    return ""


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text of the last ``user`` message ('' when there is none)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return text_of(message.get("content"))
    return ""


def estimate_tokens(body: Mapping[str, Any]) -> int:
    """Estimate a request's prompt tokens from its character count, as OpenAI does.

    About four characters per token, plus a small per-message overhead. Works for chat
    (``messages`` and Anthropic's ``system``), embeddings (``input``) and plain ``prompt``.
    """
    chars = 0
    overhead = 0
    for message in body.get("messages") or ():
        if isinstance(message, Mapping):
            chars += len(text_of(message.get("content")))
            overhead += 4
    system = body.get("system")
    if system is not None:
        chars += len(text_of(system))
        overhead += 4
    inputs = body.get("input", body.get("prompt"))
    if isinstance(inputs, str):
        chars += len(inputs)
    elif isinstance(inputs, Sequence):
        for item in inputs:
            chars += len(item) if isinstance(item, str | list) else 1
    return max(1, math.ceil(chars / 4) + overhead)


def tagged_words(tag: str) -> list[str]:
    """The words of the natural (uncut) text answer for *tag*: ``[tag]`` and 15..46 more."""
    seed = int(tag, 16)
    natural = 16 + seed % 32
    return [f"[{tag}]"] + [_WORDS[(seed >> (i % 24) ^ i) % len(_WORDS)] for i in range(1, natural)]


def completion_plan(
    body: Mapping[str, Any], *, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> tuple[str, int, bool]:
    """``(text, completion_tokens, truncated)`` for a chat/messages request body.

    The natural length is 16..47 tokens (from the hash); ``max_tokens`` (or
    ``max_completion_tokens``) truncates it, and ``truncated`` says so. This is the plain
    text answer: requests that ask for JSON are answered by
    :func:`llmbatch.testing._structured.plan_output`.
    """
    prompt = last_user_text(body.get("messages") or ())
    tag = content_tag(prompt)
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens
    words = tagged_words(tag)
    natural = len(words)
    n = max(1, min(natural, int(limit)))
    words = words[:n]
    return " ".join(words), n, n < natural


def text_output(body: Mapping[str, Any]) -> Output:
    """The plain-text :class:`Output` for *body* (see :func:`completion_plan`)."""
    return Output(*completion_plan(body))


def openai_chat_completion(
    body: Mapping[str, Any],
    *,
    completion_id: str,
    created: int,
    prompt_tokens: int | None = None,
    output: Output | None = None,
    cached_tokens: int = 0,
) -> dict[str, Any]:
    """A ``chat.completion`` object answering *body* (``n`` choices, ``usage`` included);
    each choice says *output* (default: :func:`text_output`). *cached_tokens* read from
    the prompt cache appear as ``usage.prompt_tokens_details`` (only when there are some)."""
    output = output or text_output(body)
    text, tokens, truncated = output.text, output.tokens, output.truncated
    n = int(body.get("n") or 1)
    prompt_tokens = estimate_tokens(body) if prompt_tokens is None else prompt_tokens
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": body.get("model"),
        "system_fingerprint": "fp_llmbatch_sim",
        "choices": [
            {
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": None if output.refusal else text,
                    "refusal": text if output.refusal else None,
                },
                "logprobs": None,
                "finish_reason": "length" if truncated else "stop",
            }
            for i in range(n)
        ],
        "usage": openai_usage(prompt_tokens, tokens * n, cached_tokens),
    }


def openai_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """A chat completion's ``usage``; ``prompt_tokens`` includes the cached ones."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens, "audio_tokens": 0}
    return usage


def anthropic_usage(
    input_tokens: int, output_tokens: int, cache: CacheUse | None
) -> dict[str, Any]:
    """A message's ``usage``: with *cache* marked, ``input_tokens`` leaves out what was read
    from and written to the prompt cache, reported beside it as Anthropic does."""
    if cache is None or not cache.marked:
        return {"input_tokens": input_tokens, "output_tokens": output_tokens}
    return {
        "input_tokens": input_tokens - cache.read - cache.written,
        "cache_creation_input_tokens": cache.written,
        "cache_read_input_tokens": cache.read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": cache.written - cache.written_1h,
            "ephemeral_1h_input_tokens": cache.written_1h,
        },
        "output_tokens": output_tokens,
    }


def tool_use_id(message_id: str) -> str:
    """The ``toolu_…`` id of the tool call in the message *message_id*."""
    return "toolu_" + hashlib.sha256(message_id.encode()).hexdigest()[:24]


def anthropic_message(
    body: Mapping[str, Any],
    *,
    message_id: str,
    input_tokens: int | None = None,
    output: Output | None = None,
    cache: CacheUse | None = None,
) -> dict[str, Any]:
    """A Messages API ``message`` object answering *body* (``input_tokens``: the estimate,
    if the caller has it already) with *output* (default: :func:`text_output`), and the
    prompt-cache figures of *cache* (see :func:`anthropic_usage`).

    A tool call is one ``tool_use`` block with ``stop_reason: "tool_use"``, as when
    ``tool_choice`` forces a tool (or ``"max_tokens"`` when cut short). A refusal is its
    text with ``stop_reason: "refusal"``.
    """
    output = output or text_output(body)
    input_tokens = estimate_tokens(body) if input_tokens is None else input_tokens
    content: dict[str, Any]
    if output.tool is not None:
        content = {
            "type": "tool_use",
            "id": tool_use_id(message_id),
            "name": output.tool["name"],
            "input": output.tool["input"],
        }
        stop_reason = "max_tokens" if output.truncated else "tool_use"
    else:
        content = {"type": "text", "text": output.text}
        stop_reason = "max_tokens" if output.truncated else "end_turn"
        if output.refusal:
            stop_reason = "refusal"
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": body.get("model"),
        "content": [content],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": anthropic_usage(input_tokens, output.tokens, cache),
    }


def _vector(text: str, dimensions: int) -> list[float]:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    raw = [(digest[i % len(digest)] ^ (i * 37 & 0xFF)) / 255.0 - 0.5 for i in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


def embeddings_response(body: Mapping[str, Any]) -> dict[str, Any]:
    """An embeddings ``list`` answering *body*; each vector is a function of its input."""
    inputs = body.get("input")
    items = [inputs] if isinstance(inputs, str) else list(inputs or [])
    dimensions = int(body.get("dimensions") or 16)
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": _vector(item if isinstance(item, str) else json.dumps(item), dimensions),
        }
        for i, item in enumerate(items)
    ]
    tokens = estimate_tokens(body)
    return {
        "object": "list",
        "data": data,
        "model": body.get("model"),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
