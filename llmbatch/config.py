"""Provider/model profiles: limits, prices and the batch discount, per model.

A :class:`ModelProfile` says how fast a model may be called (:class:`~llmbatch.limits.Limits`)
and what it costs (US dollars per million input, cached-input, cache-write and output
tokens). Built-in
profiles cover common models with conservative first-tier limits; a model without one gets
``Limits.auto()`` (learned from the provider's headers) and no price.

Override or add profiles in ``llmbatch.toml`` (the working directory's, or the file named
by ``LLMBATCH_CONFIG``; or a ``[tool.llmbatch.models."..."]`` table in ``pyproject.toml``)::

    [models."openai/gpt-4o-mini"]
    rpm = 5000
    tpm = 2000000
    max_concurrency = 128
    timeout = 120           # seconds one attempt may wait for the answer
    input_price = 0.15      # USD per 1M input tokens
    cached_input_price = 0.075   # read from the provider's prompt cache
    output_price = 0.60
    context_window = 128000   # tokens: prompt and max_tokens together

The environment variable ``LLMBATCH_PROFILES`` overrides both, with the same settings
as JSON: ``LLMBATCH_PROFILES='{"openai/gpt-4o-mini": {"rpm": 5000}}'``.

A model served under another name (an Azure OpenAI *deployment*) names the model it
serves with ``base_model``: its profile starts from that model's (the provider's own, else
OpenAI's), prices and context window included, and the settings beside it apply on top::

    [models."azure/my-deployment"]
    base_model = "gpt-4o-mini"
    tpm = 50000             # the deployment's quota (Azure: RPM = 6 per 1,000 TPM)

What a *provider* offers is a :class:`ProviderProfile` (:data:`BUILTIN_PROVIDERS`):
whether it has a Batch API, its discount, file limits and completion window, and where
its rate limits come from. A model profile without its own ``batch_discount`` takes its
provider's. Add or change one in a ``[providers."name"]`` table (or under
``"providers"`` in ``LLMBATCH_PROFILES``), e.g. an OpenAI-compatible server that offers
``/files`` + ``/batches``::

    [providers.my-vllm]
    batch = true
    batch_discount = 0.0
    batch_max_requests = 10000

Quotas are kept in the process by default. To share each quota among every process and
host that uses it (8 workers, a cluster), name a Redis server; :class:`LimiterSettings`
reads it, and every :class:`~llmbatch.client.LLMClient` then paces through Redis::

    [limiter]
    url = "redis://127.0.0.1:6379/0"    # or rediss://..., unix://...; "memory": in-process
    namespace = "team-a"                # separates applications sharing a Redis server

``LLMBATCH_LIMITER_URL`` and ``LLMBATCH_LIMITER_NAMESPACE`` override the file.

API keys are never read from this file: only from the environment or an explicit argument.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from llmbatch.errors import redact
from llmbatch.limits import Limits
from llmbatch.models import Usage

__all__ = [
    "BUILTIN_PROFILES",
    "BUILTIN_PROVIDERS",
    "LimiterSettings",
    "ModelProfile",
    "ProviderProfile",
    "config_file",
    "limiter_settings",
    "load_profiles",
    "load_providers",
    "load_settings",
    "profile_for",
    "provider_profile",
    "read_settings",
]

_LIMIT_FIELDS = {f.name for f in fields(Limits)}


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelProfile:
    """How to call one model, and what it costs.

    Args:
        provider: ``"openai"``, ``"anthropic"``, ``"local"``...
        model: the model name.
        limits: the rate limits to pace at.
        input_price: USD per million input tokens (``None``: unknown).
        output_price: USD per million output tokens.
        cached_input_price: USD per million input tokens read from the provider's prompt
            cache (default: the input price).
        cache_write_price: USD per million input tokens written to the prompt cache
            (Anthropic's ``cache_creation_input_tokens``, 1.25x the input price for the
            5-minute cache; default: the input price). Priced once :class:`Usage` reports
            the tokens written (see :meth:`cost`).
        batch_discount: the Batch API's discount (0.5 = half price).
        batch_min_items: the smallest job ``mode="auto"`` sends through the Batch API.
        context_window: the most tokens one request may hold, prompt and ``max_tokens``
            together (``None``: unknown, not checked). Knowing it lets a request that
            can never fit fail before it is sent, instead of paying a rate-limit permit
            and a round trip for the provider's 400 (:func:`~llmbatch.tokens.check_context_window`).
        timeout: seconds one attempt may wait for this model's answer (``None``: the
            client's default, 120 s); raise it for slow reasoning models.
        base_model: the model this one serves, when its name is another (an Azure
            deployment): where its prices and context window came from.
    """

    provider: str
    model: str
    limits: Limits = field(default_factory=Limits.auto)
    input_price: float | None = None
    output_price: float | None = None
    cached_input_price: float | None = None
    cache_write_price: float | None = None
    batch_discount: float = 0.5
    batch_min_items: int = 100
    context_window: int | None = None
    timeout: float | None = None
    base_model: str | None = None

    def cost(self, usage: Usage, *, batch: bool = False) -> float | None:
        """The price of *usage* in USD, or ``None`` when the prices are unknown.

        Input tokens read from the prompt cache (``cached_tokens``) cost
        ``cached_input_price``, those written to it ``cache_write_price``, the rest
        ``input_price``; the Batch API's discount applies on top (Anthropic's cache
        prices stack with it).
        """
        if self.input_price is None or self.output_price is None:
            return None
        cached_price = _or(self.cached_input_price, self.input_price)
        write_price = _or(self.cache_write_price, self.input_price)
        written = usage.cache_write_tokens
        uncached = max(0, usage.input_tokens - usage.cached_tokens - written)
        total = (
            uncached * self.input_price
            + usage.cached_tokens * cached_price
            + written * write_price
            + usage.output_tokens * self.output_price
        ) / 1_000_000
        return total * (1 - self.batch_discount) if batch else total


def _or(price: float | None, default: float) -> float:
    return default if price is None else price


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderProfile:
    """What one provider offers: the paths to its models, and the facts of its Batch API.

    The numbers live here, not in the adapters: an OpenAI-compatible server's batch
    backend takes its file limits, completion window and discount from its provider's
    profile, and ``mode="auto"`` sends a job through a Batch API only where ``batch``
    says there is one.

    Args:
        name: the provider's name (``provider`` in model profiles).
        online: answers requests one at a time.
        batch: has a Batch API llmbatch drives (OpenAI's ``/files`` + ``/batches``, or
            the provider's own).
        batch_discount: the Batch API's price cut (0.5 = half price); model profiles
            without their own take it.
        batch_max_requests: the most requests one batch (file) may hold.
        batch_max_bytes: the largest batch file, in bytes.
        completion_window: the ``completion_window`` a batch asks for.
        limits_source: where the pace comes from: ``"headers"`` (every response reports
            the limits and what remains), ``"remaining headers"`` (what remains only: the
            limits are inferred from it, see :mod:`llmbatch.providers.azure`),
            ``"profile and 429s"`` (no such headers: the model profile, lowered by 429s),
            or ``"profile"`` (the model profile alone).
        base_url: its OpenAI-compatible base URL, when it has one: an
            :class:`~llmbatch.providers.openai.OpenAIProvider` pointed there takes this
            provider's name (and so its profiles).
        daily_request_headers: its ``x-ratelimit-*-requests`` headers count requests
            per *day* (Groq's do), not per minute: they are left out of the pacing, which
            would otherwise read a daily allowance as a per-minute limit.
    """

    name: str
    online: bool = True
    batch: bool = False
    batch_discount: float = 0.5
    batch_max_requests: int = 50_000
    batch_max_bytes: int = 200 * 1024 * 1024
    completion_window: str = "24h"
    limits_source: str = "profile"
    base_url: str | None = None
    daily_request_headers: bool = False


_MB = 1024 * 1024

#: What each provider offers (late 2026, from the providers' documents: PROTOCOLS.md).
#: Discounts are against the same provider's online price.
BUILTIN_PROVIDERS: Mapping[str, ProviderProfile] = {
    p.name: p
    for p in (
        ProviderProfile(
            name="openai",
            batch=True,
            limits_source="headers",
            base_url="https://api.openai.com/v1",
        ),
        ProviderProfile(
            name="anthropic",
            batch=True,
            batch_max_requests=100_000,
            batch_max_bytes=256 * _MB,
            limits_source="headers",
        ),
        # Global Batch: 50% off Global Standard; files of up to 100,000 requests, 200 MB
        ProviderProfile(
            name="azure",
            batch=True,
            batch_max_requests=100_000,
            limits_source="remaining headers",
        ),
        ProviderProfile(
            name="gemini",
            batch=True,
            batch_max_bytes=2048 * _MB,
            completion_window="48h",
            limits_source="profile and 429s",
        ),
        ProviderProfile(
            name="groq",
            batch=True,
            batch_discount=0.25,
            limits_source="headers",
            daily_request_headers=True,  # requests per day; tokens per minute
            base_url="https://api.groq.com/openai/v1",
        ),
        ProviderProfile(
            name="together",
            batch=True,
            batch_max_bytes=100 * _MB,
            limits_source="headers",
            base_url="https://api.together.xyz/v1",
        ),
        ProviderProfile(
            name="fireworks",
            batch=True,
            limits_source="headers",
            base_url="https://api.fireworks.ai/inference/v1",
        ),
        ProviderProfile(name="local"),
    )
}


def provider_profile(
    name: str, *, providers: Mapping[str, ProviderProfile] | None = None
) -> ProviderProfile:
    """The profile of the provider *name*, or one with no Batch API (an unknown
    OpenAI-compatible server: online only until a profile says otherwise)."""
    table = BUILTIN_PROVIDERS if providers is None else providers
    return table.get(name) or ProviderProfile(name=name)


def _provider_from(
    name: str, table: Mapping[str, Any], base: ProviderProfile | None
) -> ProviderProfile:
    known = {f.name for f in fields(ProviderProfile)} - {"name"}
    unknown = set(table) - known
    if unknown:
        raise ValueError(
            f"llmbatch.toml: unknown settings for provider {name!r}: {sorted(unknown)}"
        )
    types = {
        "online": bool,
        "batch": bool,
        "batch_discount": float,
        "batch_max_requests": int,
        "batch_max_bytes": int,
        "completion_window": str,
        "limits_source": str,
        "base_url": str,
        "daily_request_headers": bool,
    }
    changes: dict[str, Any] = {}
    for key, value in table.items():
        kind = types[key]
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok:
            raise ValueError(
                f"llmbatch.toml: {key} for provider {name!r} must be a {kind.__name__}, "
                f"not {value!r}"
            )
        changes[key] = float(value) if kind is float else value
    discount = changes.get("batch_discount", 0.0)
    if not 0.0 <= discount < 1.0:
        raise ValueError(
            f"llmbatch.toml: batch_discount for provider {name!r} must be within [0, 1)"
        )
    return replace(base or ProviderProfile(name=name), **changes)


def _profile(
    provider: str,
    model: str,
    prices: tuple[float, float],
    *,
    window: int,
    cache: tuple[float | None, float | None] = (None, None),
    **limits: Any,
) -> ModelProfile:
    return ModelProfile(
        provider=provider,
        model=model,
        # a starting estimate: the limits the provider reports for the key replace it
        limits=Limits(learn=True, **limits),
        input_price=prices[0],
        output_price=prices[1],
        cached_input_price=cache[0],
        cache_write_price=cache[1],
        context_window=window,
    )


def _anthropic_cache(input_price: float) -> tuple[float, float]:
    """Anthropic's prompt-cache prices: reads at 0.1x the input price, writes to the
    5-minute cache at 1.25x (the 1-hour cache's 2x is not modelled)."""
    return round(input_price * 0.1, 6), round(input_price * 1.25, 6)


#: the context window of the local provider's default ``n_ctx``
#: (:data:`llmbatch.providers.local.DEFAULT_N_CTX`; config cannot import a provider)
_LOCAL_N_CTX = 2048


_OPENAI_CHAT = {
    # model: (prices, cached input price, context window)
    "gpt-4o-mini": ((0.15, 0.60), 0.075, 128_000),
    "gpt-4o": ((2.50, 10.00), 1.25, 128_000),
    "gpt-4.1-mini": ((0.40, 1.60), 0.10, 1_047_576),
    "gpt-4.1": ((2.00, 8.00), 0.50, 1_047_576),
}
_AZURE_BASES = tuple(
    _profile("openai", model, prices, window=window, cache=(cached, None))
    for model, (prices, cached, window) in _OPENAI_CHAT.items()
)

#: Conservative defaults (first usage tier; list prices in USD per 1M tokens, late 2026).
#: They are starting estimates: the limits the provider reports for your key in its
#: response headers replace them, higher or lower (``Limits.learn``).
BUILTIN_PROFILES: Mapping[str, ModelProfile] = {
    f"{p.provider}/{p.model}": p
    for p in (
        # OpenAI's automatic prompt caching reads at half the input price (gpt-4o),
        # a quarter (gpt-4.1); writing costs nothing extra
        _profile(
            "openai",
            "gpt-4o-mini",
            (0.15, 0.60),
            window=128_000,
            cache=(0.075, None),
            rpm=500,
            tpm=200_000,
        ),
        _profile(
            "openai",
            "gpt-4o",
            (2.50, 10.00),
            window=128_000,
            cache=(1.25, None),
            rpm=500,
            tpm=30_000,
        ),
        _profile(
            "openai",
            "gpt-4.1-mini",
            (0.40, 1.60),
            window=1_047_576,
            cache=(0.10, None),
            rpm=500,
            tpm=200_000,
        ),
        _profile(
            "openai",
            "gpt-4.1",
            (2.00, 8.00),
            window=1_047_576,
            cache=(0.50, None),
            rpm=500,
            tpm=30_000,
        ),
        _profile(
            "openai",
            "text-embedding-3-small",
            (0.02, 0.0),
            window=8_191,
            rpm=3000,
            tpm=1_000_000,
        ),
        _profile(
            "openai",
            "text-embedding-3-large",
            (0.13, 0.0),
            window=8_191,
            rpm=3000,
            tpm=1_000_000,
        ),
        _profile(
            "anthropic",
            "claude-haiku-4-5",
            (1.00, 5.00),
            window=200_000,
            cache=_anthropic_cache(1.00),
            rpm=50,
            input_tpm=50_000,
            output_tpm=10_000,
        ),
        _profile(
            "anthropic",
            "claude-sonnet-4-5",
            (3.00, 15.00),
            window=200_000,
            cache=_anthropic_cache(3.00),
            rpm=50,
            input_tpm=30_000,
            output_tpm=8_000,
        ),
        # Gemini (paid tier 1; <=200k-token prompts for 2.5 Pro): implicit caching reads at
        # a tenth of the input price. Gemini reports no limits in headers: these pace
        # the job, and its 429s (with their retryDelay) correct it. Its TPM counts input
        # tokens. RPD is left out: a per-day 429 stops the job (QuotaExhausted).
        _profile(
            "gemini",
            "gemini-2.5-flash",
            (0.30, 2.50),
            window=1_048_576,
            cache=(0.03, None),
            rpm=1000,
            tpm=1_000_000,
        ),
        _profile(
            "gemini",
            "gemini-2.5-flash-lite",
            (0.10, 0.40),
            window=1_048_576,
            cache=(0.01, None),
            rpm=4000,
            tpm=4_000_000,
        ),
        _profile(
            "gemini",
            "gemini-2.5-pro",
            (1.25, 10.00),
            window=1_048_576,
            cache=(0.125, None),
            rpm=150,
            tpm=2_000_000,
        ),
        # Azure OpenAI: the model name is the deployment's. Deployments named after their
        # model find these (Global Standard list prices, OpenAI's); others name it with
        # base_model. Limits: a starting estimate of a deployment's quota (RPM = 6 per
        # 1,000 TPM); what its responses report replaces it.
        *(
            replace(
                served,
                provider="azure",
                base_model=served.model,
                limits=Limits(learn=True, tpm=50_000, rpm=300),
            )
            for served in _AZURE_BASES
        ),
        ModelProfile(
            provider="local",
            model="SmolLM2-135M-Instruct",
            limits=Limits(max_concurrency=1),
            input_price=0.0,
            output_price=0.0,
            context_window=_LOCAL_N_CTX,
        ),
    )
}


def _from_table(
    name: str,
    table: Mapping[str, Any],
    base: ModelProfile | None,
    profiles: Mapping[str, ModelProfile] | None = None,
    providers: Mapping[str, ProviderProfile] | None = None,
) -> ModelProfile:
    provider, _, model = name.partition("/")
    if not model:
        raise ValueError(f"llmbatch.toml: model names are 'provider/model', not {name!r}")
    unknown = (
        set(table)
        - _LIMIT_FIELDS
        - {"input_price", "output_price", "cached_input_price", "cache_write_price"}
        - {"batch_discount"}
        - {"batch_min_items", "context_window", "timeout", "base_model"}
    )
    if unknown:
        raise ValueError(f"llmbatch.toml: unknown settings for {name!r}: {sorted(unknown)}")
    window = table.get("context_window")
    if "context_window" in table and (
        not isinstance(window, int) or isinstance(window, bool) or window < 1
    ):
        raise ValueError(
            f"llmbatch.toml: context_window for {name!r} must be a whole number of tokens "
            f"(at least 1), not {window!r}"
        )
    timeout = table.get("timeout")
    if "timeout" in table and (
        not isinstance(timeout, int | float) or isinstance(timeout, bool) or not timeout > 0
    ):
        raise ValueError(
            f"llmbatch.toml: timeout for {name!r} must be a positive number of seconds, "
            f"not {timeout!r}"
        )
    served = table.get("base_model")
    if served is not None:
        base = _served_by(name, served, profiles or {})
    if base is None:
        discount = provider_profile(provider, providers=providers).batch_discount
        base = ModelProfile(provider=provider, model=model, batch_discount=discount)
        start = Limits(learn=True)
    else:
        start = base.limits
    profile = base
    limit_changes = {k: v for k, v in table.items() if k in _LIMIT_FIELDS}
    if limit_changes:
        profile = replace(profile, limits=start.copy(**limit_changes))
    price_changes: dict[str, Any] = {
        k: int(v) if k in ("batch_min_items", "context_window") else float(v)
        for k, v in table.items()
        if k not in _LIMIT_FIELDS and k != "base_model"
    }
    return replace(profile, **price_changes)


def _served_by(name: str, served: Any, profiles: Mapping[str, ModelProfile]) -> ModelProfile:
    """The starting profile of *name*, a model serving *served* under another name: the
    provider's own profile of *served*, else OpenAI's, renamed."""
    provider, _, model = name.partition("/")
    if not isinstance(served, str) or not served:
        raise ValueError(f"llmbatch.toml: base_model for {name!r} must be a model name")
    found = profiles.get(f"{provider}/{served}") or profiles.get(f"openai/{served}")
    if found is None:
        raise ValueError(
            f"llmbatch.toml: base_model {served!r} for {name!r} has no profile "
            f"(neither {provider}/{served} nor openai/{served})"
        )
    return replace(found, provider=provider, model=model, base_model=served)


def config_file(path: str | Path | None = None) -> Path | None:
    """The configuration file in force: *path*, else ``$LLMBATCH_CONFIG``, else
    ``./llmbatch.toml``, else ``./pyproject.toml`` if it has a ``[tool.llmbatch]`` table.

    Raises:
        ValueError: a file named explicitly does not exist.
    """
    chosen = path or os.environ.get("LLMBATCH_CONFIG")
    if chosen:
        if not Path(chosen).is_file():
            raise ValueError(f"configuration file not found: {chosen}")
        return Path(chosen)
    if Path("llmbatch.toml").is_file():
        return Path("llmbatch.toml")
    pyproject = Path("pyproject.toml")
    if pyproject.is_file():
        with pyproject.open("rb") as f:
            if "llmbatch" in tomllib.load(f).get("tool", {}):
                return pyproject
    return None


def read_settings(path: str | Path | None = None) -> tuple[Path | None, dict[str, Any]]:
    """The configuration file in force (see :func:`config_file`) and its llmbatch
    settings (the ``[tool.llmbatch]`` table of a ``pyproject.toml``), or ``(None, {})``:
    what every table's reader (``[models]``, ``[limiter]``, ``[cache]``...) starts from."""
    return _settings(path)


def _settings(path: str | Path | None) -> tuple[Path | None, dict[str, Any]]:
    """See :func:`read_settings`."""
    found = config_file(path)
    if found is None:
        return None, {}
    with found.open("rb") as f:
        data = tomllib.load(f)
    if found.name == "pyproject.toml":
        data = data.get("tool", {}).get("llmbatch", {})
    return found, data


def load_profiles(path: str | Path | None = None) -> dict[str, ModelProfile]:
    """The built-in profiles, overridden by the TOML file, then by ``LLMBATCH_PROFILES``.

    Args:
        path: the file (default: see :func:`config_file`).

    Raises:
        ValueError: the file has unknown settings, a bad model name, or bad limits.
    """
    return _profiles_from(_settings(path)[1])


def load_providers(path: str | Path | None = None) -> dict[str, ProviderProfile]:
    """The built-in provider profiles, overridden and extended by the ``[providers]``
    tables of the configuration file (see :func:`config_file`).

    Raises:
        ValueError: a table has unknown settings or values of the wrong type.
    """
    return _providers_from(_settings(path)[1])


def _providers_from(data: Mapping[str, Any]) -> dict[str, ProviderProfile]:
    providers = dict(BUILTIN_PROVIDERS)
    for name, table in (data.get("providers") or {}).items():
        providers[name] = _provider_from(name, table, providers.get(name))
    return providers


def _profiles_from(data: Mapping[str, Any]) -> dict[str, ModelProfile]:
    profiles = dict(BUILTIN_PROFILES)
    providers = _providers_from(data)
    for name, table in (data.get("models") or {}).items():
        profiles[name] = _from_table(name, table, profiles.get(name), profiles, providers)
    overrides = os.environ.get("LLMBATCH_PROFILES")
    if overrides:
        try:
            tables = json.loads(overrides)
        except ValueError as exc:
            raise ValueError(f"LLMBATCH_PROFILES is not valid JSON: {exc}") from None
        if not isinstance(tables, dict):
            raise ValueError("LLMBATCH_PROFILES must be a JSON object of model settings")
        for name, table in tables.items():
            profiles[name] = _from_table(name, table, profiles.get(name), profiles, providers)
    return profiles


def profile_for(
    provider: str, model: str, *, profiles: Mapping[str, ModelProfile] | None = None
) -> ModelProfile:
    """The profile of *provider*/*model*, or an unpriced ``Limits.auto()`` one (with
    its built-in provider's batch discount)."""
    table = load_profiles() if profiles is None else profiles
    found = table.get(f"{provider}/{model}")
    if found is not None:
        return found
    discount = provider_profile(provider).batch_discount
    return ModelProfile(provider=provider, model=model, batch_discount=discount)


# -- where quotas are kept ----------------------------------------------------------------

_REDIS_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True, slots=True, kw_only=True)
class LimiterSettings:
    """Where rate-limit quotas are kept.

    Args:
        url: ``None`` keeps them in this process; a ``redis://``, ``rediss://`` or
            ``unix://`` URL shares each quota through that Redis server with every
            process that names it.
        namespace: separates applications that share one Redis server.
    """

    url: str | None = None
    namespace: str = "default"

    def __post_init__(self) -> None:
        if self.url is not None:
            scheme = self.url.partition("://")[0].lower()
            if "://" not in self.url or scheme not in _REDIS_SCHEMES:
                raise ValueError(
                    f"unsupported limiter URL {redact(self.url)!r}: use redis://host:port/db, "
                    "rediss://... or unix://..., or 'memory' for this process only"
                )
        if not self.namespace or any(c.isspace() for c in self.namespace):
            raise ValueError(f"the limiter namespace must be a word, not {self.namespace!r}")

    @classmethod
    def parse(cls, url: str | None, namespace: str | None = None) -> LimiterSettings:
        """Settings from a URL as users write it (``""`` or ``"memory"``: in-process)."""
        chosen = None if url is None or url.strip().lower() in ("", "memory") else url.strip()
        return cls(url=chosen, namespace=namespace or "default")

    @property
    def shared(self) -> bool:
        """Whether quotas are shared through Redis."""
        return self.url is not None

    def describe(self) -> str:
        """For logs: ``"in-process"`` or the URL without its password."""
        return "in-process" if self.url is None else redact(self.url)

    def __repr__(self) -> str:
        return f"LimiterSettings(url={self.describe()!r}, namespace={self.namespace!r})"


def limiter_settings(path: str | Path | None = None, *, url: str | None = None) -> LimiterSettings:
    """The configured :class:`LimiterSettings`: ``$LLMBATCH_LIMITER_URL`` and
    ``$LLMBATCH_LIMITER_NAMESPACE`` if set, else the ``[limiter]`` table of the
    configuration file (see :func:`config_file`), else in-process.

    Args:
        path: the configuration file (default: see :func:`config_file`).
        url: a URL given explicitly (``--limiter-url``): it replaces the configured
            one, while the namespace still comes from the configuration, so every
            process of an application shares the same quotas however it was told.

    Raises:
        ValueError: an unsupported URL or unknown ``[limiter]`` settings.
    """
    return _limiter_from(*_settings(path), url)


def _limiter_from(found: Path | None, data: Mapping[str, Any], url: str | None) -> LimiterSettings:
    table: Mapping[str, Any] = data.get("limiter") or {}
    unknown = set(table) - {"url", "namespace"}
    if found is not None and unknown:
        raise ValueError(f"{found.name}: unknown [limiter] settings: {sorted(unknown)}")
    if url is None:
        url = os.environ.get("LLMBATCH_LIMITER_URL", table.get("url"))
    namespace = os.environ.get("LLMBATCH_LIMITER_NAMESPACE", table.get("namespace"))
    return LimiterSettings.parse(url, namespace)


def load_settings(
    path: str | Path | None = None, *, url: str | None = None
) -> tuple[dict[str, ModelProfile], LimiterSettings]:
    """:func:`load_profiles` and :func:`limiter_settings` together, reading the
    configuration file once (what a client needs when it starts)."""
    found, data = _settings(path)
    return _profiles_from(data), _limiter_from(found, data, url)
