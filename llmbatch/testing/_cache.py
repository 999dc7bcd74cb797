"""Prompt caching, as each provider reports it, for the simulator's online and batch answers.

**OpenAI** caches automatically: a prompt of at least 1,024 tokens whose beginning was
sent before (same key, same model) has that beginning read from the cache, reported
as ``usage.prompt_tokens_details.cached_tokens`` in steps of 128 tokens (1,024, 1,152,
1,280...). ``prompt_tokens`` still counts every prompt token, and so does TPM. The
prefix covers ``tools`` and ``response_format`` (its schema), then the messages in order.

**Anthropic** caches what a request marks: each content block (system, message, tool)
carrying ``"cache_control": {"type": "ephemeral"}`` ends a prefix that may be cached
(at most four per request). A marked prefix shorter than the model's minimum is not
cached (:func:`anthropic_min_tokens`). The longest marked prefix held in the cache is
read (``cache_read_input_tokens``); the rest up to the last marked prefix is written
(``cache_creation_input_tokens``, split by TTL in ``cache_creation``), and
``input_tokens`` is what is left: the three add up to the prompt. Reads do not count
toward ITPM; writes do.

Entries live 5 minutes from their last use (``"ttl": "1h"``: an hour; OpenAI's
``prompt_cache_retention: "24h"``: a day), on the clock the caller passes: the
simulator's clock online, the batch schedule's item times in a batch (each batch has a
cache of its own). Token positions use the simulator's own estimate
(:func:`~llmbatch.testing._content.estimate_tokens`: about four characters a token,
plus four per message and for the system prompt), so ``tools`` enter the prefix's
identity but not its length. Everything is a pure function of the requests and the
times: the same run reports the same figures.

A request's entries become readable as soon as it is admitted (a real server needs the
first answer to have begun), so concurrent requests with a new prefix write it once,
not once each: the simulator is the optimistic case.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "NO_CACHE",
    "OPENAI_MIN_TOKENS",
    "CacheUse",
    "PromptCache",
    "anthropic_min_tokens",
    "cache_control_problem",
]

#: the shortest prompt OpenAI caches, and the step its cached prefix grows by
OPENAI_MIN_TOKENS = 1024
OPENAI_STEP = 128
#: Anthropic's minimum cacheable prompt per model (name prefixes; Anthropic's prompt
#: caching documentation, 2026); other models: 1,024 (Sonnet 4.5, Opus 4/4.1, Sonnet 4...)
ANTHROPIC_MIN_TOKENS: tuple[tuple[str, int], ...] = (
    ("claude-opus-4-6", 4096),
    ("claude-opus-4-5", 4096),
    ("claude-haiku-4-5", 4096),
    ("claude-sonnet-4-6", 2048),
    ("claude-3-5-haiku", 2048),
    ("claude-3-haiku", 2048),
)
ANTHROPIC_DEFAULT_MIN_TOKENS = 1024
#: seconds an entry lives after its last use, by ``cache_control.ttl`` / retention
_TTLS = {"5m": 300.0, "1h": 3600.0, "in-memory": 300.0, "24h": 86_400.0}
DEFAULT_TTL = 300.0
#: the most ``cache_control`` blocks Anthropic accepts in one request
MAX_BREAKPOINTS = 4
#: sweep expired entries after this many commits
_SWEEP_EVERY = 1024


def anthropic_min_tokens(model: str) -> int:
    """The shortest prefix Anthropic caches for *model*."""
    for prefix, tokens in ANTHROPIC_MIN_TOKENS:
        if model.startswith(prefix):
            return tokens
    return ANTHROPIC_DEFAULT_MIN_TOKENS


@dataclass(frozen=True, slots=True)
class CacheUse:
    """What one request reads from and writes to the prompt cache.

    Args:
        read: prompt tokens read from the cache.
        written: prompt tokens written to it (Anthropic), by TTL in ``written_1h``.
        written_1h: the part of ``written`` kept for an hour.
        marked: the request uses caching, so its usage reports the cache fields
            (Anthropic: it has ``cache_control``; OpenAI: something was read).
        entries: ``(digest, ttl)`` of every prefix the request keeps in the cache.
    """

    read: int = 0
    written: int = 0
    written_1h: int = 0
    marked: bool = False
    entries: tuple[tuple[bytes, float], ...] = ()


#: a request that touches no cache
NO_CACHE = CacheUse()


def _ttl(control: Any) -> float:
    ttl = control.get("ttl") if isinstance(control, Mapping) else None
    return _TTLS.get(ttl, DEFAULT_TTL) if isinstance(ttl, str) else DEFAULT_TTL


def _blocks(content: Any) -> list[Any]:
    """A message's (or ``system``'s) content as blocks: a string is one text block."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content) if isinstance(content, list) else []


def _controls(body: Mapping[str, Any]) -> Iterator[Any]:
    """Every ``cache_control`` value in an Anthropic request."""
    for tool in body.get("tools") or ():
        if isinstance(tool, Mapping) and "cache_control" in tool:
            yield tool["cache_control"]
    system = body.get("system")
    blocks = _blocks(system) if isinstance(system, list) else []
    for message in body.get("messages") or ():
        if isinstance(message, Mapping):
            blocks += _blocks(message.get("content"))
    for block in blocks:
        if isinstance(block, Mapping) and "cache_control" in block:
            yield block["cache_control"]


def cache_control_problem(body: Mapping[str, Any]) -> str | None:
    """Why Anthropic would refuse the ``cache_control`` of *body* (a 400), or None."""
    controls = list(_controls(body))
    for control in controls:
        if not isinstance(control, Mapping) or control.get("type") != "ephemeral":
            return "cache_control: Input tag does not match the expected tag 'ephemeral'"
        ttl = control.get("ttl")
        if ttl is not None and ttl not in ("5m", "1h"):
            return "cache_control.ttl: Input should be '5m' or '1h'"
    if len(controls) > MAX_BREAKPOINTS:
        return (
            f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. "
            f"Found {len(controls)}."
        )
    return None


def _identity(block: Any) -> bytes:
    """What a block contributes to a prefix's identity besides its text."""
    if not isinstance(block, Mapping):
        return json.dumps(block, sort_keys=True, default=str).encode()
    rest = {k: v for k, v in block.items() if k not in ("text", "cache_control")}
    return json.dumps(rest, sort_keys=True, default=str).encode()


def _text(block: Any) -> str:
    text = block.get("text") if isinstance(block, Mapping) else None
    return text if isinstance(text, str) else ""


class _Prefix:
    """A running digest of a prompt and its position in the simulator's tokens."""

    __slots__ = ("chars", "digest", "overhead")

    def __init__(self, scope: str) -> None:
        self.digest = hashlib.sha256(scope.encode())
        self.overhead = 0
        self.chars = 0

    @property
    def tokens(self) -> int:
        """Tokens so far, as :func:`estimate_tokens` counts them (rounded down)."""
        return self.overhead + self.chars // 4

    def start(self, overhead: int, identity: bytes) -> None:
        """Begin a segment (a message, a block) costing *overhead* tokens."""
        self.overhead += overhead
        self.digest.update(b"\x1e" + identity + b"\x1f")

    def feed(self, text: str) -> None:
        self.digest.update(text.encode())
        self.chars += len(text)

    def snapshot(self) -> bytes:
        return self.digest.copy().digest()


class PromptCache:
    """The prompt cache of one server (online) or one batch: digests of cached prefixes
    and when each expires. Lookups are pure; :meth:`commit` keeps what a request wrote."""

    __slots__ = ("_commits", "_entries")

    def __init__(self) -> None:
        self._entries: dict[bytes, float] = {}
        self._commits = 0

    def __repr__(self) -> str:
        return f"<PromptCache entries={len(self._entries)}>"

    def _live(self, digest: bytes, now: float) -> bool:
        expires = self._entries.get(digest)
        return expires is not None and now <= expires

    def commit(self, use: CacheUse, now: float) -> None:
        """Keep (or refresh) the prefixes *use* read or wrote, from *now*."""
        for digest, ttl in use.entries:
            self._entries[digest] = max(self._entries.get(digest, 0.0), now + ttl)
        self._commits += 1
        if self._commits % _SWEEP_EVERY == 0:
            self._entries = {d: t for d, t in self._entries.items() if t >= now}

    def lookup(
        self, provider: str, scope: str, body: Mapping[str, Any], prompt_tokens: int, now: float
    ) -> CacheUse:
        """What a request with *body* reads and writes at *now*, per *provider*'s rules;
        *scope* (key and model) separates caches."""
        if provider == "anthropic":
            return self._anthropic(scope, body, prompt_tokens, now)
        return self._openai(scope, body, prompt_tokens, now)

    # -- OpenAI: automatic, in 128-token steps from 1,024 -------------------------------

    def _openai(
        self, scope: str, body: Mapping[str, Any], prompt_tokens: int, now: float
    ) -> CacheUse:
        if prompt_tokens < OPENAI_MIN_TOKENS:
            return NO_CACHE
        retention = body.get("prompt_cache_retention")
        ttl = _TTLS.get(retention, DEFAULT_TTL) if isinstance(retention, str) else DEFAULT_TTL
        prefix = _Prefix("openai\x00" + scope)
        head = {k: body.get(k) for k in ("tools", "response_format")}
        prefix.start(0, json.dumps(head, sort_keys=True, default=str).encode())
        targets = range(OPENAI_MIN_TOKENS, prompt_tokens + 1, OPENAI_STEP)
        digests = list(_openai_digests(prefix, body.get("messages") or (), targets))
        read = 0
        for tokens, digest in reversed(digests):
            if self._live(digest, now):
                read = tokens
                break
        entries = tuple((digest, ttl) for _, digest in digests)
        return CacheUse(read=read, marked=read > 0, entries=entries)

    # -- Anthropic: cache_control breakpoints ---------------------------------------------

    def _anthropic(
        self, scope: str, body: Mapping[str, Any], prompt_tokens: int, now: float
    ) -> CacheUse:
        if next(_controls(body), None) is None:
            return NO_CACHE
        minimum = anthropic_min_tokens(str(body.get("model") or ""))
        # (tokens, digest, ttl) at every marked block long enough to be cached
        marks = [m for m in _anthropic_marks(scope, body) if m[0] >= minimum]
        if not marks:
            return CacheUse(marked=True)
        read = 0
        for tokens, digest, _ in reversed(marks):
            if self._live(digest, now):
                read = tokens
                break
        written = written_1h = 0
        covered = read
        for tokens, _, ttl in marks:
            if tokens > covered:
                written += tokens - covered
                written_1h += tokens - covered if ttl > DEFAULT_TTL else 0
                covered = tokens
        total = min(prompt_tokens, read + written)
        written = total - read
        written_1h = min(written_1h, written)
        entries = tuple((digest, ttl) for _, digest, ttl in marks)
        return CacheUse(read, written, written_1h, marked=True, entries=entries)


def _openai_digests(
    prefix: _Prefix, messages: Sequence[Any], targets: Sequence[int]
) -> Iterator[tuple[int, bytes]]:
    """``(tokens, digest)`` of the prompt's first *tokens* for each of *targets* (sorted)
    that the messages reach."""
    pending = iter(targets)
    target = next(pending, None)
    for message in messages:
        if target is None:
            return
        role = message.get("role") if isinstance(message, Mapping) else None
        prefix.start(4, str(role).encode())
        blocks = _blocks(message.get("content") if isinstance(message, Mapping) else None)
        for block in blocks:
            prefix.start(0, _identity(block))
            text = _text(block)
            pos = 0
            while target is not None:
                need = max(0, (target - prefix.overhead) * 4 - prefix.chars)
                if need > len(text) - pos:
                    break
                prefix.feed(text[pos : pos + need])
                pos += need
                yield target, prefix.snapshot()
                target = next(pending, None)
            prefix.feed(text[pos:])


def _anthropic_marks(scope: str, body: Mapping[str, Any]) -> Iterator[tuple[int, bytes, float]]:
    """``(tokens, digest, ttl)`` at the end of every block marked with ``cache_control``,
    in prompt order: tools, then system, then messages."""
    prefix = _Prefix("anthropic\x00" + scope)
    for tool in body.get("tools") or ():
        prefix.start(0, _identity(tool))
        if isinstance(tool, Mapping) and "cache_control" in tool:
            yield prefix.tokens, prefix.snapshot(), _ttl(tool["cache_control"])
    segments: list[tuple[str, Any]] = []
    if body.get("system") is not None:
        segments.append(("system", body.get("system")))
    for message in body.get("messages") or ():
        if isinstance(message, Mapping):
            segments.append((str(message.get("role")), message.get("content")))
    for role, content in segments:
        prefix.start(4, role.encode())
        for block in _blocks(content):
            prefix.start(0, _identity(block))
            prefix.feed(_text(block))
            if isinstance(block, Mapping) and "cache_control" in block:
                yield prefix.tokens, prefix.snapshot(), _ttl(block["cache_control"])
