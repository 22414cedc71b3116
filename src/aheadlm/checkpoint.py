"""Load a target model from a GGUF file or a Hugging Face folder into our Transformer.

GGUF files are dequantized once and cached as float32 safetensors next to the converted tokenizer,
so later loads are memory-mapped reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from .config import SLIDING, ModelConfig, from_hf_config
from .errors import ModelNotFoundError, UnsupportedModelError, WeightsError
from .kv_cache import DEFAULT_MAX_STEP
from .model import Embedding, Transformer
from .packed import PackedEmbedding, PackedLinear, QTensor, dense, fuse, packable
from .progress import progress, status
from .registry import cache_dir
from .tokenizer import Tokenizer

CACHE_FORMAT = 2

# Hugging Face parameter names -> ours. Gemma's post_attention_layernorm is a sandwich norm; Llama's
# is the norm before the MLP.
_HF_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn.q",
    "self_attn.k_proj": "attn.k",
    "self_attn.v_proj": "attn.v",
    "self_attn.o_proj": "attn.o",
    "self_attn.q_norm": "attn.q_norm",
    "self_attn.k_norm": "attn.k_norm",
    "pre_feedforward_layernorm": "mlp_norm",
    "post_feedforward_layernorm": "post_mlp_norm",
    "mlp.gate_proj": "mlp.gate",
    "mlp.up_proj": "mlp.up",
    "mlp.down_proj": "mlp.down",
    # Gemma 4
    "layer_scalar": "layer_scalar",
    "per_layer_input_gate": "ple_gate",
    "per_layer_projection": "ple_proj",
    "post_per_layer_input_norm": "ple_norm",
    "router.scale": "router.scale",
    "router.per_expert_scale": "router.per_expert_scale",
    "router.proj": "router.proj",
    "experts.gate_up_proj": "experts.gate_up_proj",
    "experts.down_proj": "experts.down_proj",
    "post_feedforward_layernorm_1": "post_mlp_norm_1",
    "pre_feedforward_layernorm_2": "pre_moe_norm",
    "post_feedforward_layernorm_2": "post_moe_norm",
}
_HF_TOP = {
    "embed_tokens.weight": "embed.weight",
    "norm.weight": "norm.weight",
    "embed_tokens_per_layer.weight": "embed_per_layer.weight",
    "per_layer_model_projection.weight": "per_layer_proj.weight",
    "per_layer_projection_norm.weight": "per_layer_norm.weight",
}
_HF_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_HF_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+?)(\.weight|\.bias)?$")


def hf_to_ours(name: str, arch: str) -> str | None:
    """Our parameter name for a Hugging Face one (None for tensors we skip, e.g. vision towers)."""
    if name == "lm_head.weight":
        return name
    for p in _HF_PREFIXES:
        if name.startswith(p):
            name = name[len(p) :]
            break
    else:
        return None
    if name in _HF_TOP:
        return _HF_TOP[name]
    m = _HF_LAYER_RE.match(name)
    if not m:
        return None
    i, mod, kind = m.groups()
    if mod == "post_attention_layernorm":
        mod = "mlp_norm" if arch == "llama" else "post_attn_norm"
    else:
        mod = _HF_LAYER.get(mod)
    return None if mod is None else f"layers.{i}.{mod}{kind or ''}"


def hf_state_dict(tensors, config: ModelConfig):
    """Map (name, tensor) pairs from a Hugging Face checkpoint to ours; Gemma norms become 1 + w."""
    for name, t in tensors:
        ours = hf_to_ours(name, config.arch)
        if ours is None or (ours == "lm_head.weight" and config.tie_embeddings):
            continue
        if config.arch == "gemma3" and ours.endswith("norm.weight"):
            t = t.float() + 1.0
        yield ours, t


def _replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def build_model(
    config: ModelConfig,
    tensors,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    packed: bool | None = None,
    nibbles: bool = True,
) -> Transformer:
    """Instantiate without random init and fill from (name, tensor) pairs; strict about names/shapes.

    With float32 on CPU, int8-block (GGUF) and bfloat16 matrices stay packed for the compiled
    kernels (`packed=False` dequantizes them to dense float32 instead); blocks of 4-bit values are
    kept two to a byte unless `nibbles=False` (the same products, more bytes)."""
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if packed is None:
        packed = dtype == torch.float32 and str(device) == "cpu"
    state, divisors, done = {}, None, set()
    for name, t in tensors:
        if name == "rope_freqs":
            divisors = t
            continue
        if name not in expected:
            continue
        if tuple(t.shape) != expected[name]:
            raise WeightsError(f"tensor {name} has shape {tuple(t.shape)}, config expects {expected[name]}")
        module_path = name.rsplit(".", 1)[0]
        module = model.get_submodule(module_path)
        compact = isinstance(t, QTensor) or t.dtype == torch.bfloat16
        if packed and compact and name.endswith(".weight") and packable(t):
            if isinstance(module, Embedding):
                head = module_path == "embed" and config.tie_embeddings
                _replace_module(model, module_path, PackedEmbedding(t, nibbles, head=head))
                done.add(name)
                continue
            if isinstance(module, nn.Linear):
                # an output head keeps its rows too: clustered draft heads score rows of it
                rows = module_path == "lm_head"
                _replace_module(model, module_path, PackedLinear(t, nibbles=nibbles, rows=rows))
                done.add(name)
                continue
        state[name] = dense(t).to(device=device, dtype=dtype)
    for name in done:  # biases of packed layers move into the packed module
        path = name.rsplit(".", 1)[0]
        bias = state.pop(f"{path}.bias", None)
        if bias is not None:
            model.get_submodule(path).bias = nn.Parameter(bias.float(), requires_grad=False)
            done.add(f"{path}.bias")
    missing = sorted(set(expected) - set(state) - done)
    if missing:
        raise WeightsError(f"weights lack {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    model.load_state_dict(state, assign=True, strict=False)
    model.fuse(fuse)
    model.init_rope(device)
    if divisors is not None:
        model.set_rope_divisors(divisors.to(device))
    return model.eval()


# -- GGUF ----------------------------------------------------------------------------------------
def _gguf_cache_path(path: Path) -> Path:
    st = path.stat()
    key = f"{CACHE_FORMAT}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{path.stem}-{digest}"


def _convert_gguf(path: Path, out: Path) -> None:
    """Dequantize a GGUF once into `out` (config.json, model.safetensors, tokenizer)."""
    from safetensors.torch import save_file

    from .gguf_file import GGUFFile

    status(f"First load of {path.name}: dequantizing and caching (once)")
    f = GGUFFile(path)
    config = f.config()
    tensors = {}
    for name, t in progress(f.tensors(config), total=f.num_tensors(), desc="unpack"):
        tensors.update(t.tensors(name) if isinstance(t, QTensor) else {name: t})
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    status("Converting the GGUF tokenizer (once)")
    Tokenizer.from_gguf(path).save(tmp)
    meta = {"source": str(path.resolve()), "tensor_types": f.tensor_types()}
    (tmp / "source.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def _load_cached_dir(d: Path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = ModelConfig.from_dict(json.loads((d / "config.json").read_text()))
    try:
        tensors = load_file(str(d / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{d}: cached weights unreadable ({e}); delete the folder to rebuild") from None
    return config, QTensor.collect(tensors).items(), Tokenizer.load(d)


def hf_config(path: Path) -> ModelConfig:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ModelNotFoundError(f"{path}: no config.json (expected a Hugging Face model folder)")
    try:
        raw = json.loads(cfg_file.read_text())
        if not isinstance(raw, dict):
            raise TypeError(f"a JSON object was expected, not {type(raw).__name__}")
        config = from_hf_config(raw)
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as e:  # ValueError: JSON, UTF-8
        raise WeightsError(f"{cfg_file}: malformed config ({type(e).__name__}: {e})") from None
    except WeightsError as e:
        raise WeightsError(f"{cfg_file}: {e}") from None
    towers = [k.removesuffix("_config") for k in ("vision_config", "audio_config") if raw.get(k)]
    if towers:
        status(f"{path.name}: loading the text model only ({' and '.join(towers)} towers are skipped)")
    return config


def hf_folder_weights(path: Path, config: ModelConfig, only: set[str] | None = None):
    """Our (name, tensor) pairs from a folder's safetensors shards, read lazily one tensor at a
    time in the stored dtype (bf16 checkpoints stay bf16 and are packed, not widened); `only`
    limits the reading to those of our names."""
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{path}: no *.safetensors files")

    def tensors():
        for fp in files:
            try:
                with safe_open(str(fp), framework="pt") as f:
                    for k in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                        ours = hf_to_ours(k, config.arch)
                        if ours is not None and (only is None or ours in only):
                            yield k, f.get_tensor(k)
            except (SafetensorError, OSError) as e:
                raise WeightsError(f"{fp}: corrupt or truncated safetensors file ({e})") from None

    return hf_state_dict(tensors(), config)


def _hf_folder(path: Path):
    config = hf_config(path)
    return config, hf_folder_weights(path, config), Tokenizer.load(path)


def load_checkpoint(path: str | os.PathLike):
    """(config, iterator of (name, tensor), tokenizer) for a GGUF file or HF folder."""
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"{p}: no such file or folder")
    if p.is_dir():
        if (p / "aheadlm_tokenizer.json").exists() and (p / "model.safetensors").exists():
            return _load_cached_dir(p)
        return _hf_folder(p)
    if p.suffix.lower() != ".gguf":
        with open(p, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise UnsupportedModelError(f"{p}: not a GGUF file or a model folder")
    out = _gguf_cache_path(p)
    if not (out / "model.safetensors").exists():
        _convert_gguf(p, out)
    return _load_cached_dir(out)


def load_model(path, dtype=torch.float32, device="cpu") -> tuple[Transformer, Tokenizer]:
    config, tensors, tokenizer = load_checkpoint(path)
    return build_model(config, tensors, dtype, device), tokenizer


def read_config(path: str | os.PathLike) -> ModelConfig:
    """A model's config without loading its weights (GGUF metadata or config.json)."""
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"{p}: no such file or folder")
    if p.is_dir():
        if (p / "aheadlm_tokenizer.json").exists():
            return ModelConfig.from_dict(json.loads((p / "config.json").read_text()))
        return hf_config(p)
    from .gguf_file import GGUFFile

    return GGUFFile(p).config()


def summary(config: ModelConfig, context: int = 4096) -> dict:
    """Parameter count and memory estimates: weights at 2 bytes (bf16, how Hugging Face folders
    stay packed) and 4 bytes (float32), and the float32 KV cache for `context` tokens."""
    kv = 0
    for layer, t in enumerate(config.layer_types):
        if config.kv_source(layer) != layer:
            continue  # KV-shared layers store nothing
        ring = config.sliding_window + DEFAULT_MAX_STEP if t == SLIDING and config.sliding_window else context
        slots = min(context, ring)
        kv += 2 * slots * config.type_kv_heads(t) * config.type_head_dim(t) * 4
    n = config.num_params
    return {
        "arch": config.arch,
        "params": n,
        "params_b": round(n / 1e9, 3),
        "layers": config.num_layers,
        "hidden": config.hidden_size,
        "vocab": config.vocab_size,
        "context": config.max_position,
        "weights_gib_bf16": round(n * 2 / 2**30, 2),
        "weights_gib_fp32": round(n * 4 / 2**30, 2),
        f"kv_cache_mib_{context}": round(kv / 2**20, 1),
    }
