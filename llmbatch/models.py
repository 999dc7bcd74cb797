"""The values that travel through llmbatch: requests, responses, usage. All frozen."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from llmbatch.structured import ResponseModel, ResponseSchema

__all__ = ["Embedding", "EmbeddingRequest", "Request", "Response", "Usage"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """Tokens one call consumed.

    ``input_tokens`` counts every prompt token, those read from a prompt cache included
    (as OpenAI reports it; Anthropic's separate cache counts are added in);
    ``cached_tokens`` is the part read from the cache, ``cache_write_tokens`` the part
    written to it (Anthropic's ``cache_creation_input_tokens``, priced higher).
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """One chat completion to make.

    Args:
        messages: the chat messages (``{"role": ..., "content": ...}``).
        model: the model (``None``: the client's default).
        max_tokens: the output cap (``None``: the client's default).
        temperature: sampling temperature, if set.
        n: completions per request.
        response_format: e.g. ``{"type": "json_object"}``; the text is then parsed.
        response_model: a typed answer: a pydantic model class (or a dataclass or
            ``TypedDict``), a JSON Schema dict, or a
            :class:`~llmbatch.structured.ResponseSchema`. Each provider enforces it its
            best way, and the client validates the answer into ``Response.parsed``
            (re-asking when it is invalid). Kept as a ``ResponseSchema``
            (:attr:`schema`).
        extra: other provider parameters, passed through.
        key: the item's key (for error records and checkpoints).
    """

    messages: Sequence[Mapping[str, Any]]
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    n: int = 1
    response_format: Mapping[str, Any] | None = None
    response_model: ResponseModel | None = None
    extra: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    key: str | None = None

    def __post_init__(self) -> None:
        if self.response_model is not None:
            if self.response_format is not None:
                raise ValueError("give response_model or response_format, not both")
            object.__setattr__(self, "response_model", ResponseSchema.of(self.response_model))
        if not self.messages:
            raise ValueError("a request needs at least one message")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, not {self.max_tokens!r}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, not {self.n!r}")
        object.__setattr__(self, "messages", tuple(dict(m) for m in self.messages))

    @property
    def schema(self) -> ResponseSchema[Any] | None:
        """The typed answer asked for (``response_model``), if any."""
        model = self.response_model
        return model if isinstance(model, ResponseSchema) else None

    @classmethod
    def from_prompt(cls, prompt: str, *, system: str | None = None, **options: Any) -> Request:
        """A request with one user message (and an optional system message).

        Raises:
            ValueError: the prompt is empty or only whitespace.
        """
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        messages: list[dict[str, str]] = []
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": prompt})
        return cls(messages=messages, **options)


@dataclass(frozen=True, slots=True, kw_only=True)
class Response:
    """What a provider answered.

    Attributes:
        text: the (first) completion's text.
        model: the model that answered.
        usage: the tokens the call consumed.
        finish_reason: why the output stopped (``"stop"``, ``"length"``...).
        request_id: the provider's request id.
        latency: seconds the successful attempt took.
        attempts: how many attempts the call needed.
        parsed: the validated answer when the request has a ``response_model`` (an
            instance of the model, or a dict for a JSON Schema); the JSON-decoded text
            when it asked for JSON with ``response_format``.
        refusal: the model's refusal message, when it declined to answer (OpenAI's
            ``message.refusal``, Anthropic's ``stop_reason="refusal"``).
        reasks: how many follow-up requests an invalid structured answer needed.
        cached: no request was made for this item: the answer came from the response
            cache, or from an identical request of the same job (``cost`` is then 0).
        key: the item's key, copied from the request.
        cost: the price of the call in USD, when the model's prices are known.
        provider: the provider that answered (its ``name``; a fallback's when one
            answered), set by :class:`~llmbatch.client.LLMClient`.
        headers: the response headers (rate-limit feedback), not part of equality.
    """

    text: str
    model: str | None = None
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None
    request_id: str | None = None
    latency: float = 0.0
    attempts: int = 1
    parsed: Any = None
    refusal: str | None = None
    reasks: int = 0
    cached: bool = False
    key: str | None = None
    cost: float | None = None
    provider: str | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: _EMPTY, compare=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class EmbeddingRequest:
    """One text to embed.

    Args:
        input: the text.
        model: the embedding model (``None``: the client's default).
        dimensions: the vector size, for models that can shorten it.
        key: the item's key (for error records, checkpoints and batches).
    """

    input: str
    model: str | None = None
    dimensions: int | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if not self.input.strip():
            raise ValueError("the text to embed is empty")
        if self.dimensions is not None and self.dimensions < 1:
            raise ValueError(f"dimensions must be >= 1, not {self.dimensions!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Embedding:
    """What a provider answered to an :class:`EmbeddingRequest`.

    Attributes:
        vector: the embedding.
        model: the model that answered.
        usage: the tokens the call consumed (input only).
        request_id: the provider's request id.
        latency: seconds the successful attempt took.
        attempts: how many attempts the call needed.
        key: the item's key, copied from the request.
        cost: the price of the call in USD, when the model's prices are known.
        headers: the response headers (rate-limit feedback), not part of equality.
    """

    vector: tuple[float, ...]
    model: str | None = None
    usage: Usage = field(default_factory=Usage)
    request_id: str | None = None
    latency: float = 0.0
    attempts: int = 1
    key: str | None = None
    cost: float | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: _EMPTY, compare=False, repr=False)
