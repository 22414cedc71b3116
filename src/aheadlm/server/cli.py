"""`aheadlm serve`: load the model (and its drafter), start the scheduler, run uvicorn."""

from __future__ import annotations

import sys

from ..api import load
from ..errors import InvalidRequestError
from ..proposers import HybridProposer, MTPProposer, NgramProposer
from .app import ServerState, create_app
from .batching import BatchEngine
from .scheduler import Scheduler


def add_arguments(p) -> None:
    p.add_argument("--model", "-m", default="gemma3-270m")
    p.add_argument("--drafter", "-d", default=None, help="none | ngram | mtp | drafter folder (default: shipped MTP)")
    p.add_argument("--draft-tokens", "-k", type=int, default=4)
    p.add_argument("--fallback-k", type=int, default=None, help="with ngram+X: most drafts of X")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--slots", type=int, default=8, help="requests decoded together (batch rows)")
    p.add_argument("--draft-max-batch", type=int, default=3, help="speculate only while at most this many requests run")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 503")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--n-ctx", type=int, default=4096, help="context per request")
    p.add_argument("--max-tokens", type=int, default=512, help="default max_tokens")
    p.add_argument("--dtype", default=None)
    p.add_argument("--kv-dtype", default=None, help="KV cache: float32 or bfloat16 (half the memory; default: --dtype)")
    p.add_argument("--device", default=None)


def build_state(a) -> ServerState:
    # checked before the model loads, so a typo costs no wait
    if a.slots < 1 or a.max_queue < 1:
        raise InvalidRequestError("--slots and --max-queue must be at least 1")
    if a.api_key is not None and not a.api_key.strip():
        raise InvalidRequestError("--api-key must not be empty (an unset variable?); leave it out to serve without one")
    if not 0 <= a.port <= 65535:
        raise InvalidRequestError(f"--port must be in 0..65535, got {a.port}")
    if not 0 < a.timeout < float("inf") or a.max_tokens < 1 or a.draft_max_batch < 0:
        raise InvalidRequestError(
            "--timeout must be a positive number, --max-tokens at least 1 and --draft-max-batch at least 0"
        )
    llm = load(
        a.model,
        drafter=a.drafter,
        draft_tokens=a.draft_tokens,
        fallback_k=a.fallback_k,
        dtype=a.dtype,
        device=a.device,
        n_ctx=a.n_ctx,
        kv_dtype=a.kv_dtype,
    )
    prop = llm.engine.proposer
    lookup = isinstance(prop, (NgramProposer, HybridProposer))
    mtp = prop.fallback if isinstance(prop, HybridProposer) else prop
    if not (prop is None or isinstance(prop, NgramProposer) or isinstance(mtp, MTPProposer)):
        raise InvalidRequestError("the server supports the none, ngram, mtp and ngram+mtp proposers")
    engine = BatchEngine(
        llm.engine.model,
        drafter=mtp.drafter if isinstance(mtp, MTPProposer) else None,
        ngram=lookup,
        num_draft=a.draft_tokens,
        slots=a.slots,
        draft_max_batch=a.draft_max_batch,
        n_ctx=llm.engine.n_ctx,
        fallback_k=prop.fallback_k if isinstance(prop, HybridProposer) else None,
        kv_dtype=llm.engine.kv_dtype,
    )
    from ..registry import resolve

    path = resolve(a.model)
    size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return ServerState(
        llm=llm,
        scheduler=Scheduler(engine, a.max_queue),
        name=llm.name,
        n_ctx=engine.n_ctx,
        api_key=a.api_key,
        timeout=a.timeout,
        default_max_tokens=a.max_tokens,
        file_size=size,
    )


def _check_listen(host: str, port: int) -> None:
    """Fail before the model loads, with one line, where uvicorn would log and exit later."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # IPv6 hosts such as ::
        with socket.create_server((host, port), family=family):
            pass
    except OSError as e:  # in use, no such address, no permission
        raise InvalidRequestError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


def run(a) -> int:
    import uvicorn

    if 0 <= a.port <= 65535:
        _check_listen(a.host, a.port)
    state = build_state(a)
    app = create_app(state)
    drafter = type(state.llm.engine.proposer).__name__ if state.llm.engine.proposer else "none"
    print(f"aheadlm serving {state.name} (drafter: {drafter}) on http://{a.host}:{a.port}", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=a.host, port=a.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        state.scheduler.shutdown()
    return 0
