"""A provider simulator: a real OpenAI-, Anthropic- and Gemini-compatible HTTP server on 127.0.0.1.

It answers the way the providers do under pressure (see ``shared/PROTOCOLS.md``): 429s
with the exact bodies and headers once a limit is crossed, tokens charged the way
OpenAI charges them, 5xx errors, hangs, connection resets and malformed bodies on
demand, and the Batch APIs. Point the official SDKs, or llmbatch, at it::

    async with Simulator(rpm=60, tpm=10_000) as sim:
        client = openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0)
        ...
        assert sim.stats().throttled == 0

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/embeddings``, ``GET /v1/models``
(OpenAI); ``POST /v1/messages`` (Anthropic); ``POST
/v1beta/models/{model}:generateContent`` (Gemini, ``base_url`` :attr:`Simulator.url`);
Azure OpenAI's ``POST /openai/deployments/{deployment}/chat/completions`` and
``/embeddings`` (``api-version`` query, ``api-key`` header; see
:mod:`llmbatch.testing._openai`); the Batch API routes of
:mod:`llmbatch.testing._batchsim` (OpenAI's also under ``/openai/``, as Azure's
client calls them) and Gemini's of
:mod:`llmbatch.testing._gemini` (with the File API its JSONL jobs read and write)
unless ``batch=None``; ``GET /stats`` and
``POST /stats/reset``.

Prompt caching is reported as each provider reports it (``prompt_cache``; see
:mod:`llmbatch.testing._cache`): OpenAI's ``cached_tokens`` for a repeated prefix,
Anthropic's cache reads and writes for ``cache_control`` prefixes, online and in batches.

Every online request goes through the same steps, in this order:

1. **authenticate**: ``Authorization: Bearer <key>``, ``x-api-key``, Azure's ``api-key``,
   or Gemini's ``x-goog-api-key`` / ``?key=``; 401 if missing, or not in ``api_keys`` when that is
   set (Gemini: 403 and 400 ``API_KEY_INVALID``). The key is never echoed.
2. **parse and validate**: 400 in the provider's shape (``context_length_exceeded``
   against ``context_window``; Anthropic also needs ``anthropic-version``).
3. **fault plan**: count the request for its key and pick a fault (see :class:`Fault`);
   a scripted 429 is answered here, without touching the buckets.
4. **quota**: keys under ``insufficient_quota`` get OpenAI's non-retryable 429.
5. **rate limits**, per (key, model), on the injected ``clock``: see
   :mod:`llmbatch.testing._quota` for the admission rule and ``charge_rejected``
   (Anthropic's prompt-cache reads are looked up first: they leave ITPM alone).
6. **capacity**: at most ``max_in_flight`` requests are served at once; the rest queue.
7. **latency**: ``ttft + completion_tokens / tokens_per_second``, scaled by a seeded
   jitter, slept through the injected ``sleep``.
8. **answer**, or the chosen fault: an error status, a hang, a reset or a malformed body.

Requests that ask for JSON (OpenAI ``response_format``, Anthropic forced tools and
``output_config.format``) get JSON valid for their schema, tagged with the prompt's
``[content_tag]``, unless ``invalid_json``/``schema_violations`` or a scripted
``Fault(kind="invalid_json" | "schema_violation")`` spoil it: see
:mod:`llmbatch.testing._structured`; ``stats().structured`` counts them. A scripted
``Fault(kind="refusal")`` makes the model decline any chat request (OpenAI
``message.refusal``, Anthropic ``stop_reason: "refusal"``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from types import TracebackType
from typing import Any

from aiohttp import web

from llmbatch.testing._anthropic import Messages
from llmbatch.testing._batchsim import BatchBackend, BatchSimConfig
from llmbatch.testing._config import DEFAULT_MODELS, SimulatorConfig
from llmbatch.testing._endpoint import Answer, ApiError, Endpoint, dumps
from llmbatch.testing._faults import Fault, FaultPlan, RequestInfo
from llmbatch.testing._gemini import GeminiBatches, GenerateContent, google_api_key
from llmbatch.testing._openai import (
    AzureChatCompletions,
    AzureEmbeddings,
    ChatCompletions,
    Embeddings,
)
from llmbatch.testing._quota import Quota
from llmbatch.testing._stats import Recorder, SimulatorStats
from llmbatch.testing._structured import SPOILS

__all__ = [
    "DEFAULT_MODELS",
    "BatchSimConfig",
    "Fault",
    "RequestInfo",
    "Simulator",
    "SimulatorConfig",
    "SimulatorStats",
]

#: requests may carry Batch API uploads (200 MB OpenAI files, 256 MB Anthropic batches)
_MAX_BODY = 300 * 1024 * 1024
_BAD_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
    "using your HTTP library correctly. The API expects a JSON payload, but what was sent "
    "was not valid JSON.)"
)


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ApiError(400, _BAD_JSON)
    return body


class Simulator:
    """The simulator server; use it as an async context manager, or ``start``/``aclose``.

    Args:
        config: a :class:`SimulatorConfig`; keyword ``options`` override its fields
            (``Simulator(rpm=60)`` is ``Simulator(SimulatorConfig(rpm=60))``).
        clock: the monotonic clock the rate-limit buckets read (a ``FakeClock`` in tests).
        sleep: how latency and hangs wait (default ``asyncio.sleep``).
        batch_clock: the wall clock (UNIX seconds) that moves the Batch APIs' jobs
            through their statuses; a ``FakeClock(start=1.7e9)`` steps them by hand.
        options: :class:`SimulatorConfig` fields.
    """

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        /,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        batch_clock: Callable[[], float] = time.time,
        **options: Any,
    ) -> None:
        config = replace(config, **options) if config is not None else SimulatorConfig(**options)
        self._config = config
        self._clock = clock
        self._sleep = sleep
        self._faults = FaultPlan(config.script, config.fault_fractions(), seed=config.seed)
        self._jitter = random.Random(f"jitter-{config.seed}")
        self._openai = ChatCompletions(config)
        self._anthropic = Messages(config)
        self._endpoints: list[Endpoint] = [self._openai, Embeddings(config), self._anthropic]
        self._endpoints.append(GenerateContent(config))
        self._endpoints += [AzureChatCompletions(config), AzureEmbeddings(config)]
        self._quotas: dict[tuple[str, str, str], Quota] = {}
        self._recorder = Recorder()
        self._batch = (
            BatchBackend(config.batch, clock=batch_clock, prompt_cache=config.prompt_cache)
            if config.batch
            else None
        )
        self._gemini_batch = GeminiBatches(config, clock=batch_clock) if config.batch else None
        self._id_prefix = secrets.token_hex(6)
        self._ids = itertools.count(1)
        self._semaphore: asyncio.Semaphore | None = None
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._started_at = 0.0

    def __repr__(self) -> str:
        where = self.url if self._runner is not None else "not started"
        return f"<Simulator {where} {self._config!r}>"

    @property
    def config(self) -> SimulatorConfig:
        """The configuration this simulator runs with."""
        return self._config

    @property
    def url(self) -> str:
        """The server's root URL (``http://127.0.0.1:PORT``): Anthropic's ``base_url``."""
        if self._runner is None:
            raise RuntimeError("the simulator is not running: use `async with` or `await start()`")
        return f"http://{self._config.host}:{self._port}"

    @property
    def base_url(self) -> str:
        """The OpenAI ``base_url``: :attr:`url` + ``/v1``."""
        return f"{self.url}/v1"

    def stats(self) -> SimulatorStats:
        """A snapshot of the counters (see :class:`SimulatorStats`)."""
        batch = self._batch.stats() if self._batch else {}
        if self._gemini_batch is not None:
            gemini = self._gemini_batch.stats()
            batch = {**batch, **gemini}
            batch["batches_created"] += gemini["gemini_batches_created"]
        return self._recorder.snapshot(batch)

    def reset_stats(self) -> None:
        """Zero the online counters (the batch backend keeps its own)."""
        self._recorder.reset()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> Simulator:
        """Bind the port and start serving; returns the simulator itself."""
        if self._runner is not None:
            raise RuntimeError("the simulator is already running")
        app = web.Application(client_max_size=_MAX_BODY)
        for endpoint in self._endpoints:
            app.router.add_post(endpoint.path, self._handler(endpoint))
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_get("/v1/models/{model}", self._retrieve_model)
        app.router.add_get("/stats", self._get_stats)
        app.router.add_post("/stats/reset", self._reset_stats)
        if self._batch is not None:
            self._batch.add_routes(app)
        if self._gemini_batch is not None:
            self._gemini_batch.add_routes(app)
        # handler_cancellation: a client that gives up on a hang frees the handler at once
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self._config.host, self._config.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._port = runner.addresses[0][1]
        self._runner = runner
        if self._config.max_in_flight is not None:
            self._semaphore = asyncio.Semaphore(self._config.max_in_flight)
        self._started_at = self._clock()
        return self

    async def aclose(self) -> None:
        """Stop serving and close every connection (idempotent)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Simulator:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- the request pipeline --------------------------------------------------------------

    def _handler(
        self, endpoint: Endpoint
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._serve(request, endpoint)

        return handle

    async def _serve(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        """Steps 1-8 of the module docstring for one request."""
        started = self._clock()
        recorder = self._recorder
        recorder.requests += 1
        token = f"{self._id_prefix}{next(self._ids):010x}"
        request_id = f"req_{token}"
        headers = {endpoint.request_id_header: request_id}
        quota: Quota | None = None
        reserved = produced = 0
        try:
            api_key = self._authenticate(request, endpoint)
            endpoint.check_headers(request)
            raw = await request.read()
            body = _json_object(raw)
            deployment = request.match_info.get("deployment")
            if deployment is not None:  # Azure: the path names the model, not the body
                body["model"] = deployment
            model, prompt_tokens, reserved = endpoint.validate(body)
            fault = self._pick_fault(endpoint, api_key, model, body)
            spoil = None
            if fault is not None and fault.kind in SPOILS:
                # not a transport fault: the answer itself is spoiled (see _structured)
                spoil, fault = fault.kind, None
            cache = endpoint.cache_use(api_key, model, body, prompt_tokens, self._clock())
            quota = self._admit(
                endpoint, api_key, model, prompt_tokens, reserved, headers, cache.read
            )
            ready_at_admission = self._config.prompt_cache_ready == "admitted"
            if ready_at_admission and (fault is None or fault.kind == "hang"):
                endpoint.keep_cached(cache, self._clock())  # the answer will be sent
            answer = endpoint.answer(body, prompt_tokens, token, spoil, cache)
            await self._enter()
            try:
                if fault is not None:
                    recorder.faults[fault.label] += 1
                    if fault.kind != "hang":
                        return await self._inject(fault, request, endpoint, answer, headers, model)
                    await self._sleep(self._config.hang_seconds)  # then answer, if still wanted
                response = await self._send(request, endpoint, answer, headers, started)
                if not ready_at_admission:
                    endpoint.keep_cached(cache, self._clock())  # readable once answered
            finally:
                self._leave()
            produced = answer.completion_tokens
            recorder.completion_tokens += produced
            recorder.cache_read_tokens += cache.read
            recorder.cache_write_tokens += cache.written
            recorder.responses[200] += 1
            recorder.answered(hash((endpoint.path, raw)))
            if answer.output is not None:
                recorder.structured_answer(answer.output)
            return response
        except ApiError as error:
            self._stamp(endpoint, headers, started)
            return self._error(endpoint, error, request_id, headers)
        finally:
            if quota is not None:
                endpoint.settle(quota, reserved, produced)

    def _pick_fault(
        self, endpoint: Endpoint, api_key: str, model: str, body: dict[str, Any]
    ) -> Fault | None:
        """Step 3: the fault for this request; a scripted 429 is raised right here."""
        if not self._faults:
            return None
        nth = self._faults.count(api_key)
        fault = self._faults.choose(
            RequestInfo(endpoint.provider, endpoint.path, api_key, model, nth, body)
        )
        if fault is not None and fault.kind == "error" and fault.status == 429:
            self._recorder.faults[fault.label] += 1
            raise endpoint.fault_error(fault, model)
        return fault

    def _admit(
        self,
        endpoint: Endpoint,
        api_key: str,
        model: str,
        prompt_tokens: int,
        reserved: int,
        headers: dict[str, str],
        cached: int = 0,
    ) -> Quota | None:
        """Steps 4-5: quota, then rate limits; returns the charged quota (None if unlimited).
        *cached*: the prompt tokens read from the prompt cache (see ``Endpoint.costs``).

        Raises:
            ApiError: the provider's 429 (or its out-of-credit error).
        """
        if self._out_of_quota(api_key):
            raise endpoint.out_of_quota()
        now = self._clock()
        quota = None
        if endpoint.limits:
            quota = self._quota(endpoint, api_key, model, now)
            costs = endpoint.costs(prompt_tokens, reserved, cached)
            rejection = quota.admit(costs, now, self._config.charge_rejected)
            endpoint.ratelimit_headers(quota, headers)
            if rejection is not None:
                raise endpoint.rate_limited(rejection, model)
        recorder = self._recorder
        recorder.admissions[int(now - self._started_at)] += 1
        recorder.prompt_tokens += prompt_tokens
        recorder.completion_tokens_reserved += reserved
        return quota

    async def _send(
        self,
        request: web.Request,
        endpoint: Endpoint,
        answer: Answer,
        headers: dict[str, str],
        started: float,
    ) -> web.StreamResponse:
        """Steps 7-8: wait out the simulated latency and send *answer*."""
        first, per_token = self._latency()
        if not answer.streaming:
            delay = first + per_token * answer.completion_tokens
            if delay > 0:
                await self._sleep(delay)
            self._stamp(endpoint, headers, started)
            return web.Response(
                body=answer.chunks[0], headers=headers, content_type="application/json"
            )
        if first > 0:
            await self._sleep(first)
        self._stamp(endpoint, headers, started)
        response = web.StreamResponse(headers=headers)
        response.content_type = "text/event-stream"
        response.headers["Cache-Control"] = "no-cache"
        await response.prepare(request)
        for i, event in enumerate(answer.chunks):
            if per_token > 0 and i:
                await self._sleep(per_token)
            await response.write(event)
        await response.write_eof()
        return response

    def _stamp(self, endpoint: Endpoint, headers: dict[str, str], started: float) -> None:
        """Add ``openai-processing-ms`` (OpenAI endpoints only), on the simulator's clock."""
        if endpoint.provider == "openai":
            headers["openai-processing-ms"] = str(int((self._clock() - started) * 1000))

    def _authenticate(self, request: web.Request, endpoint: Endpoint) -> str:
        headers = request.headers
        key = headers.get("x-api-key", "") or headers.get("api-key", "")
        key = key or google_api_key(request)
        if not key:
            scheme, _, credentials = headers.get("Authorization", "").partition(" ")
            key = credentials.strip() if scheme.lower() == "bearer" else ""
        if not key:
            raise endpoint.unauthorized(missing=True)
        allowed = self._config.api_keys
        if allowed is not None and key not in allowed:
            raise endpoint.unauthorized(missing=False)
        return key

    def _out_of_quota(self, api_key: str) -> bool:
        broke = self._config.insufficient_quota
        return broke if isinstance(broke, bool) else api_key in broke

    def _quota(self, endpoint: Endpoint, api_key: str, model: str, now: float) -> Quota:
        slot = (endpoint.provider, api_key, model)
        quota = self._quotas.get(slot)
        if quota is None:
            quota = self._quotas[slot] = Quota(
                endpoint.limits, now, bucket_seconds=self._config.bucket_seconds
            )
        return quota

    async def _enter(self) -> None:
        """Take a capacity slot, queueing while ``max_in_flight`` are taken."""
        recorder = self._recorder
        if self._semaphore is not None:
            recorder.queued += 1
            try:
                await self._semaphore.acquire()
            finally:
                recorder.queued -= 1
        recorder.in_flight += 1
        if recorder.in_flight > recorder.max_concurrent:
            recorder.max_concurrent = recorder.in_flight

    def _leave(self) -> None:
        self._recorder.in_flight -= 1
        if self._semaphore is not None:
            self._semaphore.release()

    def _latency(self) -> tuple[float, float]:
        """``(seconds before the first token, seconds per further token)`` for one request."""
        config = self._config
        factor = 1.0
        if config.jitter:
            factor += config.jitter * (2 * self._jitter.random() - 1)
        per_token = factor / config.tokens_per_second if config.tokens_per_second else 0.0
        return config.ttft * factor, per_token

    async def _inject(
        self,
        fault: Fault,
        request: web.Request,
        endpoint: Endpoint,
        answer: Answer,
        headers: dict[str, str],
        model: str,
    ) -> web.StreamResponse:
        """Answer with an error, a malformed body or a reset instead of *answer*."""
        if fault.kind == "error":
            raise endpoint.fault_error(fault, model)
        payload = b"".join(answer.chunks)
        if fault.kind == "malformed":
            self._recorder.responses[200] += 1
            return web.Response(
                body=payload[: len(payload) // 2], headers=headers, content_type="application/json"
            )
        # reset: promise the whole body, send half of it, then drop the connection
        response = web.StreamResponse(headers=headers)
        response.content_type = "text/event-stream" if answer.streaming else "application/json"
        response.content_length = len(payload)
        await response.prepare(request)
        await response.write(payload[: len(payload) // 2])
        if request.transport is not None:
            request.transport.abort()
        return response

    def _error(
        self, endpoint: Endpoint, error: ApiError, request_id: str, headers: dict[str, str]
    ) -> web.Response:
        recorder = self._recorder
        recorder.responses[error.status] += 1
        if error.status == 429:
            recorder.rate_limited[error.label] += 1
        headers.update(error.headers)
        return web.Response(
            status=error.status,
            body=dumps(endpoint.error_body(error, request_id)),
            headers=headers,
            content_type="application/json",
        )

    # -- models and statistics ---------------------------------------------------------------

    async def _list_models(self, request: web.Request) -> web.Response:
        return self._models(request, None)

    async def _retrieve_model(self, request: web.Request) -> web.Response:
        return self._models(request, request.match_info["model"])

    def _models(self, request: web.Request, wanted: str | None) -> web.Response:
        """``GET /v1/models[/{model}]``, in Anthropic's shape when ``anthropic-version`` is sent."""
        self._recorder.requests += 1
        endpoint = self._anthropic if "anthropic-version" in request.headers else self._openai
        request_id = f"req_{self._id_prefix}{next(self._ids):010x}"
        headers = {endpoint.request_id_header: request_id}
        models = self._config.models
        try:
            self._authenticate(request, endpoint)
            if wanted is not None and wanted not in models:
                raise endpoint.model_not_found(wanted)
        except ApiError as error:
            return self._error(endpoint, error, request_id, headers)
        payload = endpoint.model_page(models) if wanted is None else endpoint.model_info(wanted)
        self._recorder.responses[200] += 1
        return web.Response(body=dumps(payload), headers=headers, content_type="application/json")

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=dumps(self.stats().as_dict()), content_type="application/json")

    async def _reset_stats(self, request: web.Request) -> web.Response:
        self.reset_stats()
        return web.Response(status=204)
