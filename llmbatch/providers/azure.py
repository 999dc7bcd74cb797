"""Azure OpenAI: :class:`AzureOpenAIProvider`, the OpenAI adapter on the official client's
Azure class, and the few things Azure does differently.

* **Deployments are model names.** A request's ``model`` is the deployment's name: the
  client sends it in the path (``/openai/deployments/{deployment}/chat/completions
  ?api-version=...``, with the ``api-key`` header) and in Batch API lines' ``model``.
  Prices, context window and starting limits come from the profile
  ``azure/<deployment>``: built in for deployments named after their model
  (``azure/gpt-4o-mini``...), and for any other name one line in ``llmbatch.toml``
  says which model it serves (see :mod:`llmbatch.config`)::

      [models."azure/summarizer-prod"]
      base_model = "gpt-4o-mini"

* **Limits from what remains.** Azure reports what remains on every response
  (``x-ratelimit-remaining-tokens`` per minute, ``x-ratelimit-remaining-requests`` over
  its 10-second window), never the limits themselves. :class:`DeploymentQuota` infers
  them: right after admitting a request that cost *c* tokens, *r* remaining means the
  deployment holds at least *r + c*; Azure grants quota in units of 1,000 TPM, so the
  least multiple of 1,000 at or above the largest such bound never exceeds the real
  quota, and it reaches it as soon as one response comes from a bucket that was full.
  Azure allows 6 RPM per 1,000 TPM. The two are added to the response's headers as
  ``x-ratelimit-limit-tokens`` / ``-requests``, which the limiter adopts like OpenAI's
  (``limits.adopted``); a server that sends its limits is believed instead.
* **429s.** Azure's body carries ``code: "429"`` and the headers ``retry-after-ms`` /
  ``retry-after``: :func:`~llmbatch.providers.openai.classify_openai_status` makes it
  :class:`~llmbatch.errors.RateLimited` with that wait. A wait of an hour or more ("retry
  after 86400 seconds": a daily quota spent) is :class:`~llmbatch.errors.QuotaExhausted`:
  the job stops instead of sleeping for a day.
* **Global Batch**: the OpenAI batch backend on ``/openai/files`` + ``/openai/batches``
  (the client adds ``api-version``), lines whose ``url`` is ``/chat/completions``, and the
  ``azure`` provider profile's file limits, window and discount.

The endpoint, key and API version come from the arguments, else from the environment as
the official client reads them (``AZURE_OPENAI_ENDPOINT``, ``AZURE_OPENAI_API_KEY``,
``OPENAI_API_VERSION``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Literal

import openai

from llmbatch.batchapi import BatchLimits
from llmbatch.config import ProviderProfile
from llmbatch.errors import QuotaExhausted, RateLimited
from llmbatch.models import Request, Response
from llmbatch.providers.openai import (
    OpenAIBatchBackend,
    OpenAIProvider,
    StructuredOutputs,
    http_client,
)

__all__ = ["DAILY_QUOTA_WAIT", "RPM_PER_1000_TPM", "AzureOpenAIProvider", "DeploymentQuota"]

#: Azure's rule for a deployment's requests per minute: 6 per 1,000 tokens per minute
RPM_PER_1000_TPM = 6
#: Azure grants deployment quota in whole thousands of tokens per minute
_TPM_UNIT = 1000
#: a 429 asking to wait this long (seconds) or more means a quota spent for the day
DAILY_QUOTA_WAIT = 3600.0


class DeploymentQuota:
    """The limits of each deployment, inferred from Azure's ``remaining`` headers.

    Bounds only grow: each response can only show that a deployment holds at least so
    much, never less (a smaller ``remaining`` means someone spent it).
    """

    __slots__ = ("_tpm",)

    def __init__(self) -> None:
        self._tpm: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<DeploymentQuota {self._tpm!r}>"

    def tpm(self, deployment: str) -> int | None:
        """The inferred tokens per minute of *deployment* (``None``: nothing seen yet)."""
        return self._tpm.get(deployment)

    def observe(self, deployment: str, headers: Mapping[str, str], charged: int) -> dict[str, str]:
        """*headers* with the limits they imply added (``x-ratelimit-limit-tokens`` and
        ``-requests``), after a response to a request that cost *charged* tokens;
        unchanged if the server sent its limits or no ``remaining-tokens``."""
        lower = {k.lower(): v for k, v in headers.items()}
        if "x-ratelimit-limit-tokens" in lower:
            return dict(headers)
        try:
            remaining = float(lower["x-ratelimit-remaining-tokens"])
        except (KeyError, ValueError):
            return dict(headers)
        if not math.isfinite(remaining) or remaining < 0:
            return dict(headers)
        bound = math.ceil((remaining + charged) / _TPM_UNIT) * _TPM_UNIT
        tpm = max(bound, self._tpm.get(deployment, 0))
        self._tpm[deployment] = tpm
        return {
            **headers,
            "x-ratelimit-limit-tokens": str(tpm),
            "x-ratelimit-limit-requests": str(max(1, tpm * RPM_PER_1000_TPM // _TPM_UNIT)),
        }


class AzureOpenAIProvider(OpenAIProvider):
    """Chat completions and embeddings on Azure OpenAI deployments, through the official
    ``openai.AsyncAzureOpenAI`` client (see the module docstring).

    Args:
        azure_endpoint: the resource's endpoint (``https://NAME.openai.azure.com``;
            default ``$AZURE_OPENAI_ENDPOINT``).
        api_key: the resource's key (default ``$AZURE_OPENAI_API_KEY``; never shown).
        api_version: the API version (default ``$OPENAI_API_VERSION``).
        azure_deployment: one deployment every request goes to (then ``model`` only
            names its profile); by default each request's ``model`` is its deployment.
        timeout: seconds the SDK waits for an answer.
        client: an ``AsyncAzureOpenAI`` client to use instead (not closed by
            :meth:`aclose`).
        name: the provider's name in profiles and quotas.
        transport: ``"aiohttp"`` or ``"httpx"``.
        structured_outputs: as for :class:`~llmbatch.providers.openai.OpenAIProvider`
            (Azure enforces ``json_schema`` from API version 2024-08-01-preview).
        strict: as for :class:`~llmbatch.providers.openai.OpenAIProvider`.
        profile: what the provider offers (default: the ``azure`` provider profile).
    """

    def __init__(
        self,
        *,
        azure_endpoint: str | None = None,
        api_key: str | None = None,
        api_version: str | None = None,
        azure_deployment: str | None = None,
        timeout: float = 600.0,
        client: openai.AsyncAzureOpenAI | None = None,
        name: str = "azure",
        transport: Literal["aiohttp", "httpx"] = "aiohttp",
        structured_outputs: StructuredOutputs = "json_schema",
        strict: bool | None = None,
        profile: ProviderProfile | None = None,
    ) -> None:
        owns = client is None
        endpoint = azure_endpoint or os.environ.get("AZURE_OPENAI_ENDPOINT")
        if client is None and not endpoint:
            raise ValueError(
                "the azure provider needs its endpoint: azure_endpoint=, or "
                "AZURE_OPENAI_ENDPOINT in the environment"
            )
        azure = client or openai.AsyncAzureOpenAI(
            azure_endpoint=endpoint or "",
            api_key=api_key,
            api_version=api_version,
            azure_deployment=azure_deployment,
            timeout=timeout,
            max_retries=0,
            http_client=http_client(transport, timeout),
        )
        super().__init__(
            client=azure,
            name=name,
            structured_outputs=structured_outputs,
            strict=strict,
            profile=profile,
        )
        self._owns_client = owns
        #: the deployments' limits, as Azure's headers show them
        self.quota = DeploymentQuota()

    def __repr__(self) -> str:
        return f"<AzureOpenAIProvider {self.name} {self._client.base_url}>"

    async def complete(self, request: Request) -> Response:
        """One chat completion on the deployment ``request.model``; the limits Azure's
        headers imply are added to the response's (see :class:`DeploymentQuota`)."""
        try:
            response = await super().complete(request)
        except RateLimited as exc:
            if exc.retry_after is not None and exc.retry_after >= DAILY_QUOTA_WAIT:
                raise QuotaExhausted(
                    f"{exc} (the deployment's quota is spent for {exc.retry_after:,.0f} s: "
                    "raise it, or use another deployment)",
                    provider=exc.provider,
                    model=exc.model,
                    status_code=exc.status_code,
                    request_id=exc.request_id,
                    key_hint=exc.key_hint,
                ) from exc
            raise
        charged = int(self.admission(request, request.model or "")["tokens"])
        headers = self.quota.observe(request.model or "", response.headers, charged)
        return replace(response, headers=headers)

    def batch(self) -> OpenAIBatchBackend:
        """Azure's Global Batch: ``/openai/files`` + ``/openai/batches``, lines whose
        ``url`` is ``/chat/completions`` and whose ``model`` is the deployment."""
        return OpenAIBatchBackend(
            self,
            self._client,
            limits=BatchLimits(
                max_requests=self.profile.batch_max_requests,
                max_bytes=self.profile.batch_max_bytes,
                one_model=True,
            ),
            completion_window=self.profile.completion_window,
            url_prefix="",
        )
