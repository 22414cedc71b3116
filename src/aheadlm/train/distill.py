"""Self-distillation data: the target writes responses to the training prompts (batched, mixed
temperatures) and we keep, for every position, what the drafter needs: the tokens, the target's
post-norm hidden states (which also give its next-token logits through the output head) and the
K/V of the last sliding and last full-attention layers. Written as resumable safetensors shards.

Teacher-forced shards (`teacher_forced=True`) run the target over whole corpus conversations
instead: one batched prefill per sequence, several times cheaper per token than generating.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..batch import generate_batch
from ..config import FULL, SLIDING
from ..drafter import copy_key
from ..errors import InvalidRequestError, WeightsError
from ..model import Transformer
from ..progress import progress

TEMPERATURES = (0.0, 0.0, 0.7, 1.0)
"""Cycled over rows: half greedy (what greedy speculative decoding sees), half sampled."""


def feature_layers(model: Transformer, copy_layers: tuple[int, ...] = ()) -> dict[str, int]:
    """Layer type -> index of the layer whose K/V a drafter reads, plus (`drafter.copy_key`) the
    other layers a copy head reads."""
    cfg = model.config
    layers = {t: cfg.last_layer_of(t) for t in (SLIDING, FULL) if t in cfg.layer_types}
    return layers | {copy_key(i, cfg.layer_types): i for i in copy_layers}


@dataclass
class Sequence:
    tokens: torch.Tensor
    """[L + 1] int64: prompt + response."""
    n_prompt: int
    """Leading positions the target did not write (down-weighted in training); 0 for teacher-forced
    corpus text, whose every position is a training target."""
    hidden: torch.Tensor
    """[L, H] target post-norm hidden states (float32)."""
    kv: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """layer type -> (K, V) [L, kv_heads * head_dim]."""


def write_shards(
    model: Transformer,
    prompts: list[list[int]],
    out_dir: str | Path,
    *,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    per_shard: int = 64,
    stop_ids: tuple[int, ...] = (),
    seed: int = 0,
    teacher_forced: bool = False,
    generate: bool = True,
    copy_layers: tuple[int, ...] = (),
) -> list[Path]:
    """Generate and store shards of `per_shard` sequences; existing complete shards are kept, so a
    killed run continues where it stopped. With `teacher_forced`, `prompts` are whole texts that the
    target only reads (plus its one greedy next token). With `generate=False` a missing shard is an
    error (several training processes must not write the same files). `copy_layers` also keeps
    those layers' K/V, for a copy head that reads them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = feature_layers(model, copy_layers)
    paths = []
    n_shards = (len(prompts) + per_shard - 1) // per_shard
    temperatures = (0.0,) if teacher_forced else TEMPERATURES
    desc = "teacher-forced shards" if teacher_forced else "self-distillation shards"
    for s in progress(range(n_shards), desc=desc):
        path = out / f"shard_{s:05d}.safetensors"
        paths.append(path)
        if path.exists():
            continue
        if not generate:
            raise InvalidRequestError(
                f"{path} is missing: with several processes, write the data first with one process "
                "(the same command without torchrun and with --steps 0)"
            )
        chunk = prompts[s * per_shard : (s + 1) * per_shard]
        seqs: list[Sequence] = []
        t0 = time.time()
        for i in range(0, len(chunk), batch_size):
            batch = chunk[i : i + batch_size]
            temps = [temperatures[(s * per_shard + i + j) % len(temperatures)] for j in range(len(batch))]
            rows = generate_batch(
                model,
                batch,
                max_tokens=1 if teacher_forced else max_new_tokens,
                temperatures=temps,
                stop_ids=stop_ids,
                seed=seed + s * 1000 + i,
                capture_layers=tuple(layers.values()),
            )
            for r in rows:
                toks = torch.tensor(r.prompt + r.tokens, dtype=torch.long)  # CPU; hidden and K/V move at save
                kv = {t: r.kv[layer] for t, layer in layers.items()}
                seqs.append(Sequence(toks, 0 if teacher_forced else len(r.prompt), r.hidden, kv))
        save_shard(seqs, path, meta={"seconds": round(time.time() - t0, 1)})
    return paths


def save_shard(seqs: list[Sequence], path: Path, meta: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {
        "tokens": torch.cat([s.tokens for s in seqs]).to(torch.int32),
        "token_offsets": torch.tensor([0] + [len(s.tokens) for s in seqs]).cumsum(0),
        "n_prompt": torch.tensor([s.n_prompt for s in seqs]),
        "hidden": torch.cat([s.hidden for s in seqs]).to("cpu", torch.bfloat16),
    }
    for t in seqs[0].kv:
        tensors[f"k_{t}"] = torch.cat([s.kv[t][0] for s in seqs]).to("cpu", torch.bfloat16)
        tensors[f"v_{t}"] = torch.cat([s.kv[t][1] for s in seqs]).to("cpu", torch.bfloat16)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in (meta or {}).items()})
    tmp.replace(path)


def load_shard(path: Path) -> list[Sequence]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path}: unreadable data shard ({e}); delete it to regenerate") from None
    offs = t["token_offsets"].tolist()
    seqs, h0 = [], 0
    types = [k[2:] for k in t if k.startswith("k_")]
    for i in range(len(offs) - 1):
        toks = t["tokens"][offs[i] : offs[i + 1]].long()
        n = len(toks) - 1
        kv = {ty: (t[f"k_{ty}"][h0 : h0 + n], t[f"v_{ty}"][h0 : h0 + n]) for ty in types}
        seqs.append(Sequence(toks, int(t["n_prompt"][i]), t["hidden"][h0 : h0 + n], kv))
        h0 += n
    return seqs


def load_folder(folder: str | Path) -> list[Sequence]:
    """Every sequence of a data folder: its self-distillation shards, then its teacher-forced
    ones (`corpus/`), each in shard order."""
    root = Path(folder)
    paths = sorted(root.glob("shard_*.safetensors")) + sorted((root / "corpus").glob("shard_*.safetensors"))
    return [s for p in paths for s in load_shard(p)]


def shard_seconds(paths: list[Path]) -> float:
    """Total generation time recorded in the shards' metadata (also for shards of an earlier run)."""
    from safetensors import safe_open

    total = 0.0
    for p in paths:
        with safe_open(str(p), "pt") as f:
            total += float(json.loads((f.metadata() or {}).get("seconds", "0")))
    return total
