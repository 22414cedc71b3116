"""Ollama's model listing and details: `/api/tags`, `/api/ps`, `/api/version`, `/api/show`
(clients such as Open WebUI probe them before they chat)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from fastapi import FastAPI

from .. import __version__
from .protocol import OllamaShow
from .responses import now_rfc3339


def register(app: FastAPI, state, check_model: Callable[[str], None]) -> None:
    tok = state.llm.tokenizer

    def details() -> dict:
        cfg = state.llm.config
        return {
            "parent_model": "",
            "format": "gguf",
            "family": cfg.arch,
            "families": [cfg.arch],
            "parameter_size": f"{cfg.num_params / 1e6:.0f}M",
            "quantization_level": "native",
        }

    def listed() -> dict:
        return {
            "name": f"{state.name}:latest",
            "model": f"{state.name}:latest",
            "size": state.file_size,
            "digest": uuid.uuid5(uuid.NAMESPACE_URL, state.name).hex,
            "details": details(),
        }

    @app.get("/api/tags")
    async def ollama_tags():
        return {"models": [{**listed(), "modified_at": now_rfc3339()}]}

    @app.get("/api/ps")
    async def ollama_ps():
        # the one model is loaded for the server's lifetime, on the CPU unless a GPU was chosen
        on_gpu = next(state.llm.engine.model.parameters()).device.type == "cuda"
        return {"models": [{**listed(), "expires_at": "9999-12-31T23:59:59Z", "size_vram": state.file_size * on_gpu}]}

    @app.get("/api/version")
    async def ollama_version():
        return {"version": __version__}

    @app.post("/api/show")
    async def ollama_show(body: OllamaShow):
        check_model(body.model or body.name or "")
        cfg = state.llm.config
        info = {
            "general.architecture": cfg.arch,
            "general.parameter_count": cfg.num_params,
            f"{cfg.arch}.context_length": cfg.max_position,
            f"{cfg.arch}.embedding_length": cfg.hidden_size,
            f"{cfg.arch}.block_count": cfg.num_layers,
        }
        return {
            "modelfile": f"FROM {state.name}\n",
            "parameters": "",
            "template": tok.chat_template or "",
            "details": details(),
            "model_info": info,
            "capabilities": ["completion"],
            "modified_at": now_rfc3339(),
        }
