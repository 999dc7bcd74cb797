"""OpenAI's wire conventions: ``/v1/chat/completions`` and ``/v1/embeddings``.

Error bodies are ``{"error": {"message", "type", "param", "code"}}``. Each (key, model)
pair has up to four buckets: requests and tokens, per minute (``rpm``/``tpm``) and per
day (``rpd``/``tpd``). A request costs one request and ``estimated prompt tokens +
(max_completion_tokens or max_tokens or the default) x n`` tokens, charged in full at
admission and never refunded: that is OpenAI's documented reservation rule. Prompt
tokens read from the prompt cache count like any others (caching does not change rate
limits); chat answers report them as ``usage.prompt_tokens_details.cached_tokens``
(see :mod:`llmbatch.testing._cache`).

Azure OpenAI's flavour of the same endpoints (:class:`AzureChatCompletions`,
:class:`AzureEmbeddings`) serves ``/openai/deployments/{deployment}/...`` and needs the
``api-version`` query parameter. Each (key, deployment) has a tokens-per-minute bucket
(``tpm``) and a requests bucket of ``rpm`` (default: Azure's 6 per 1,000 TPM) enforced
as ``rpm / 6`` per 10 seconds, as Azure does. Responses report what remains
(``x-ratelimit-remaining-requests`` of the 10-second window, ``-tokens`` of the minute)
and never the limits; a 429 is ``{"error": {"code": "429", "message": "Requests to the
... Please retry after N seconds. ..."}}`` with ``retry-after-ms`` and ``retry-after``.
A key without quota gets Azure's 429 asking to retry after 86,400 seconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from llmbatch.testing._buckets import DAY, MINUTE, go_duration
from llmbatch.testing._cache import NO_CACHE, CacheUse
from llmbatch.testing._content import (
    DEFAULT_MAX_TOKENS,
    Output,
    embeddings_response,
    estimate_tokens,
    openai_chat_completion,
    openai_usage,
)
from llmbatch.testing._endpoint import (
    Answer,
    ApiError,
    Endpoint,
    dumps,
    minute_and_day_buckets,
    retry_headers,
)
from llmbatch.testing._faults import Fault
from llmbatch.testing._quota import Quota, Rejection
from llmbatch.testing._structured import (
    FormatError,
    Spoil,
    openai_request_spec,
    openai_spec,
    plan_output,
)

if TYPE_CHECKING:
    from aiohttp import web

    from llmbatch.testing._config import SimulatorConfig

__all__ = [
    "AZURE_API_VERSION",
    "ORGANIZATION",
    "AzureChatCompletions",
    "AzureEmbeddings",
    "ChatCompletions",
    "Embeddings",
]

#: the organization named in rate-limit messages
ORGANIZATION = "org-llmbatch-sim"
_LIMITS_URL = "Visit https://platform.openai.com/account/rate-limits to learn more."
_ROLES = ("system", "assistant", "user", "function", "tool", "developer")
_UNITS = {
    ("requests", MINUTE): "requests per min (RPM)",
    ("tokens", MINUTE): "tokens per min (TPM)",
}
_UNITS |= {("requests", DAY): "requests per day (RPD)", ("tokens", DAY): "tokens per day (TPD)"}
#: the ``created`` stamp of every listed model
_CREATED = 1_700_000_000
_SERVER_ERRORS = {
    500: "The server had an error while processing your request. Sorry about that!",
    502: "Bad gateway.",
    503: "The server is overloaded or not ready yet.",
    529: "The server is overloaded. Please try again later.",
}


def _positive_int(body: dict[str, Any], name: str, maximum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(
            400,
            f"Invalid type for '{name}': expected an integer, "
            f"but got {type(value).__name__} instead.",
            param=name,
            code="invalid_type",
        )
    if value < 1:
        raise ApiError(
            400,
            f"Invalid '{name}': integer below minimum value. "
            f"Expected a value >= 1, but got {value} instead.",
            param=name,
            code="integer_below_min_value",
        )
    if maximum is not None and value > maximum:
        raise ApiError(
            400,
            f"Invalid '{name}': integer above maximum value. "
            f"Expected a value <= {maximum}, but got {value} instead.",
            param=name,
            code="integer_above_max_value",
        )
    return value


class _OpenAI(Endpoint):
    """The conventions every OpenAI endpoint shares."""

    provider = "openai"
    request_id_header = "x-request-id"

    @staticmethod
    def bucket_specs(config: SimulatorConfig) -> list[tuple[str, float, int]]:
        return minute_and_day_buckets(config)

    def error_body(self, error: ApiError, request_id: str) -> dict[str, Any]:
        return {
            "error": {
                "message": error.message,
                "type": error.type,
                "param": error.param,
                "code": error.code,
            }
        }

    def unauthorized(self, *, missing: bool) -> ApiError:
        if missing:
            return ApiError(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        return ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    def out_of_quota(self) -> ApiError:
        return ApiError(
            429,
            "You exceeded your current quota, please check your plan and billing details. "
            "For more information on this error, read the docs: "
            "https://platform.openai.com/docs/guides/error-codes/api-errors.",
            type="insufficient_quota",
            code="insufficient_quota",
            headers={"x-should-retry": "false"},
        )

    def costs(self, prompt_tokens: int, reserved: int, cached: int = 0) -> dict[str, int]:
        return {"requests": 1, "tokens": prompt_tokens + reserved}

    def rate_limited(self, rejection: Rejection, model: str) -> ApiError:
        unit = _UNITS[rejection.name, rejection.period]
        if rejection.too_large:
            # As OpenAI sends it: no retry-after, and no x-should-retry: false either
            # (real servers do not reliably send it), so only the message says it can
            # never pass.
            return ApiError(
                429,
                f"Request too large for {model} in organization {ORGANIZATION} on {unit}: "
                f"Limit {rejection.limit}, Requested {rejection.requested}. The input or output "
                f"tokens must be reduced in order to run successfully. {_LIMITS_URL}",
                type=rejection.name,
                code="rate_limit_exceeded",
            )
        return ApiError(
            429,
            f"Rate limit reached for {model} in organization {ORGANIZATION} on {unit}: "
            f"Limit {rejection.limit}, Used {rejection.used}, Requested {rejection.requested}. "
            f"Please try again in {go_duration(rejection.retry_after)}. {_LIMITS_URL}",
            type=rejection.name,
            code="rate_limit_exceeded",
            headers=retry_headers(rejection.retry_after),
        )

    def check_headers(self, request: web.Request) -> None:
        """OpenAI needs no header beyond the API key."""

    def settle(self, quota: Quota, reserved: int, produced: int) -> None:
        """OpenAI keeps the reservation: nothing is refunded."""

    def ratelimit_headers(self, quota: Quota, headers: dict[str, str]) -> None:
        for name in ("requests", "tokens"):
            bucket = quota.bucket(name)
            if bucket is not None:
                headers[f"x-ratelimit-limit-{name}"] = str(bucket.limit)
                headers[f"x-ratelimit-remaining-{name}"] = str(bucket.remaining)
                headers[f"x-ratelimit-reset-{name}"] = go_duration(bucket.until_full())

    def fault_error(self, fault: Fault, model: str) -> ApiError:
        status = fault.status
        if status == 429:
            if fault.error_type == "insufficient_quota":
                return self.out_of_quota()
            kind = fault.error_type or "requests"
            seconds = 1.0 if fault.retry_after is None else fault.retry_after
            return ApiError(
                429,
                f"Rate limit reached for {model} in organization {ORGANIZATION} on "
                f"{_UNITS.get((kind, MINUTE), kind)}. Please try again in "
                f"{go_duration(seconds)}. {_LIMITS_URL}",
                type=kind,
                code="rate_limit_exceeded",
                headers=retry_headers(seconds),
            )
        message = _SERVER_ERRORS.get(status, f"Simulated error {status}.")
        retry_after = 1.0 if fault.retry_after is None and status == 503 else fault.retry_after
        return ApiError(
            status,
            message,
            type=fault.error_type or ("server_error" if status >= 500 else "invalid_request_error"),
            headers=retry_headers(retry_after) if retry_after is not None else None,
        )

    def model_not_found(self, model: str) -> ApiError:
        return ApiError(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            code="model_not_found",
        )

    def model_info(self, model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": _CREATED, "owned_by": "llmbatch-sim"}

    def model_page(self, models: Sequence[str]) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_info(model) for model in models]}

    def _check_model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "you must provide a model parameter")
        if self.config.reject_unknown_models and model not in self.config.models:
            raise self.model_not_found(model)
        return model


class ChatCompletions(_OpenAI):
    """``POST /v1/chat/completions``, streaming included."""

    path = "/v1/chat/completions"

    def validate(self, body: dict[str, Any]) -> tuple[str, int, int]:
        model = self._check_model(body)
        messages = body.get("messages")
        if messages is None:
            raise ApiError(
                400,
                "Missing required parameter: 'messages'.",
                param="messages",
                code="missing_required_parameter",
            )
        if not isinstance(messages, list):
            raise ApiError(
                400,
                "Invalid type for 'messages': expected an array.",
                param="messages",
                code="invalid_type",
            )
        if not messages:
            raise ApiError(
                400,
                "Invalid 'messages': empty array. Expected an array with minimum length 1, "
                "but got an empty array instead.",
                param="messages",
                code="empty_array",
            )
        for i, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            if role not in _ROLES:
                supported = ", ".join(f"'{r}'" for r in _ROLES[:-1]) + f", and '{_ROLES[-1]}'"
                raise ApiError(
                    400,
                    f"Invalid value: '{role}'. Supported values are: {supported}.",
                    param=f"messages[{i}].role",
                    code="invalid_value",
                )
        try:
            openai_request_spec(body)
        except FormatError as error:
            raise ApiError(400, error.message, param=error.param, code=error.code) from None
        max_tokens = _positive_int(body, "max_tokens")
        limit = _positive_int(body, "max_completion_tokens") or max_tokens
        n = _positive_int(body, "n", maximum=128) or 1
        prompt_tokens = estimate_tokens(body)
        window = self.config.context_window
        if prompt_tokens + (limit or 0) > window:
            raise ApiError(
                400,
                f"This model's maximum context length is {window} tokens. However, you requested "
                f"{prompt_tokens + (limit or 0)} tokens ({prompt_tokens} in the messages, "
                f"{limit or 0} in the completion). Please reduce the length of the messages "
                "or completion.",
                param="messages",
                code="context_length_exceeded",
            )
        return model, prompt_tokens, (limit or DEFAULT_MAX_TOKENS) * n

    def answer(
        self,
        body: dict[str, Any],
        prompt_tokens: int,
        token: str,
        spoil: Spoil | None = None,
        cache: CacheUse = NO_CACHE,
    ) -> Answer:
        spec = openai_spec(body, check_strict=False)
        output = plan_output(body, spec, faults=self.structured, spoil=spoil)
        counted = output if output.outcome is not None else None
        completion_id = f"chatcmpl-{token}"
        if not body.get("stream"):
            payload = openai_chat_completion(
                body,
                completion_id=completion_id,
                created=int(time.time()),
                prompt_tokens=prompt_tokens,
                output=output,
                cached_tokens=cache.read,
            )
            produced = payload["usage"]["completion_tokens"]
            return Answer([dumps(payload)], produced, streaming=False, output=counted)
        answer = self._stream(body, prompt_tokens, completion_id, output, cache.read)
        answer.output = counted
        return answer

    @staticmethod
    def _stream(
        body: dict[str, Any],
        prompt_tokens: int,
        completion_id: str,
        output: Output,
        cached_tokens: int = 0,
    ) -> Answer:
        """``chat.completion.chunk`` events: a role chunk, one per word, a finish chunk."""
        text, tokens, truncated = output.text, output.tokens, output.truncated
        n = int(body.get("n") or 1)
        options = body.get("stream_options")
        usage = isinstance(options, dict) and bool(options.get("include_usage"))
        head: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": "fp_llmbatch_sim",
        }
        if usage:
            head["usage"] = None

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return b"data: " + dumps({**head, "choices": [choice]}) + b"\n\n"

        words = text.split(" ")
        events: list[bytes] = []
        for index in range(n):
            events.append(chunk(index, {"role": "assistant", "content": "", "refusal": None}))
            field = "refusal" if output.refusal else "content"  # a refusal streams as such
            events.extend(
                chunk(index, {field: word if i == 0 else " " + word})
                for i, word in enumerate(words)
            )
            events.append(chunk(index, {}, "length" if truncated else "stop"))
        if usage:
            totals = openai_usage(prompt_tokens, tokens * n, cached_tokens)
            events.append(b"data: " + dumps({**head, "choices": [], "usage": totals}) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return Answer(events, tokens * n, streaming=True)


class Embeddings(_OpenAI):
    """``POST /v1/embeddings``: costs its input tokens only."""

    path = "/v1/embeddings"

    def validate(self, body: dict[str, Any]) -> tuple[str, int, int]:
        model = self._check_model(body)
        inputs = body.get("input")
        if inputs is None:
            raise ApiError(
                400,
                "Missing required parameter: 'input'.",
                param="input",
                code="missing_required_parameter",
            )
        if not isinstance(inputs, str | list) or not inputs:
            raise ApiError(
                400,
                "'$.input' is invalid. Please check the API reference: "
                "https://platform.openai.com/docs/api-reference.",
                param="input",
            )
        return model, estimate_tokens(body), 0

    def answer(
        self,
        body: dict[str, Any],
        prompt_tokens: int,
        token: str,
        spoil: Spoil | None = None,
        cache: CacheUse = NO_CACHE,
    ) -> Answer:
        return Answer([dumps(embeddings_response(body))], 0, streaming=False)

    def cache_use(
        self, api_key: str, model: str, body: dict[str, Any], prompt_tokens: int, now: float
    ) -> CacheUse:
        """Embeddings are never cached."""
        return NO_CACHE


# -- Azure OpenAI ----------------------------------------------------------------------------

#: the API version Azure's messages name when a request's is not at hand
AZURE_API_VERSION = "2024-10-21"
#: Azure enforces a deployment's requests per minute over 10-second windows
_AZURE_WINDOW = 10.0
#: Azure's body ``type`` marker: errors in Azure's own shape (``code`` and ``message``)
_AZURE = "azure"
_QUOTA_INCREASE = (
    "Please go here: https://aka.ms/oai/quotaincrease if you would like to further "
    "increase the default rate limit."
)


class _Azure(_OpenAI):
    """What Azure OpenAI does differently from OpenAI (see the module docstring)."""

    provider = "azure"
    operation = "ChatCompletions_Create"

    @staticmethod
    def bucket_specs(config: SimulatorConfig) -> list[tuple[str, float, int]]:
        rpm = config.rpm
        if rpm is None and config.tpm is not None:
            rpm = max(1, config.tpm * 6 // 1000)
        specs: list[tuple[str, float, int]] = []
        if rpm is not None:
            specs.append(("requests", _AZURE_WINDOW, max(1, rpm // 6)))
        if config.tpm is not None:
            specs.append(("tokens", MINUTE, config.tpm))
        return specs

    def error_body(self, error: ApiError, request_id: str) -> dict[str, Any]:
        if error.type == _AZURE:
            return {"error": {"code": error.code, "message": error.message}}
        return super().error_body(error, request_id)

    def unauthorized(self, *, missing: bool) -> ApiError:
        return ApiError(
            401,
            "Access denied due to invalid subscription key or wrong API endpoint. Make sure "
            "to provide a valid key for an active subscription and use a correct regional "
            "API endpoint for your resource.",
            type=_AZURE,
            code="401",
        )

    def check_headers(self, request: web.Request) -> None:
        """Azure needs the ``api-version`` query parameter."""
        if not request.query.get("api-version"):
            raise ApiError(
                400,
                "The api-version query parameter (?api-version=) is required for all requests.",
                type=_AZURE,
                code="MissingApiVersionParameter",
            )

    def _throttled(self, what: str, seconds: float, label: str) -> ApiError:
        wait = max(1, math.ceil(seconds - 1e-9))
        return ApiError(
            429,
            f"Requests to the {self.operation} Operation under Azure OpenAI API version "
            f"{AZURE_API_VERSION} have exceeded {what} rate limit of your current OpenAI S0 "
            f"pricing tier. Please retry after {wait} seconds. {_QUOTA_INCREASE}",
            type=_AZURE,
            code="429",
            headers=retry_headers(seconds),
            label=label,
        )

    def out_of_quota(self) -> ApiError:
        return self._throttled("token", 86_400.0, "quota")

    def rate_limited(self, rejection: Rejection, model: str) -> ApiError:
        if rejection.too_large:
            return super().rate_limited(rejection, model)
        what = "call" if rejection.name == "requests" else "token"
        return self._throttled(what, rejection.retry_after, rejection.name)

    def ratelimit_headers(self, quota: Quota, headers: dict[str, str]) -> None:
        requests = quota.bucket("requests", _AZURE_WINDOW)
        tokens = quota.bucket("tokens")
        if requests is not None:
            headers["x-ratelimit-remaining-requests"] = str(requests.remaining)
        if tokens is not None:
            headers["x-ratelimit-remaining-tokens"] = str(tokens.remaining)

    def fault_error(self, fault: Fault, model: str) -> ApiError:
        if fault.status == 429 and fault.error_type != "insufficient_quota":
            seconds = 1.0 if fault.retry_after is None else fault.retry_after
            kind = fault.error_type or "requests"
            return self._throttled("call" if kind == "requests" else "token", seconds, kind)
        if fault.status == 429:
            return self.out_of_quota()
        return super().fault_error(fault, model)

    def model_not_found(self, model: str) -> ApiError:
        return ApiError(
            404,
            "The API deployment for this resource does not exist. If you created the "
            "deployment within the last 5 minutes, please wait a moment and try again.",
            type=_AZURE,
            code="DeploymentNotFound",
        )


class AzureChatCompletions(_Azure, ChatCompletions):
    """``POST /openai/deployments/{deployment}/chat/completions?api-version=...``."""

    path = "/openai/deployments/{deployment}/chat/completions"


class AzureEmbeddings(_Azure, Embeddings):
    """``POST /openai/deployments/{deployment}/embeddings?api-version=...``."""

    path = "/openai/deployments/{deployment}/embeddings"
    operation = "Embeddings_Create"
