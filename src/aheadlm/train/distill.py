"""Self-distillation data: the target writes responses to the training prompts (batched, mixed
temperatures) and we keep, for every position, what the drafter needs: the tokens, the target's
post-norm hidden states (which also give its next-token logits through the output head) and the
K/V of the last sliding and last full-attention layers. Written as resumable safetensors shards.

Teacher-forced shards (`teacher_forced=True`) run the target over whole corpus conversations
instead: one batched prefill per sequence, several times cheaper per token than generating.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..batch import generate_batch
from ..config import FULL, SLIDING
from ..drafter import copy_key
from ..errors import InvalidRequestError, WeightsError
from ..model import Transformer
from ..progress import progress, status

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
    source: dict | None = None,
) -> list[Path]:
    """Generate and store shards of `per_shard` sequences; existing complete shards are kept, so a
    killed run continues where it stopped. With `teacher_forced`, `prompts` are whole texts that the
    target only reads (plus its one greedy next token). With `generate=False` a missing shard is an
    error (several training processes must not write the same files). `copy_layers` also keeps
    those layers' K/V, for a copy head that reads them. `source` (the model's name, the flags)
    goes into a record beside the shards (`SOURCE`); shards that another model or other settings
    wrote are then refused instead of mixed in."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if source is not None:
        record = {
            **source,
            "hidden_size": model.config.hidden_size,
            "vocab_size": model.config.vocab_size,
            "num_layers": model.config.num_layers,
            "teacher_forced": teacher_forced,
            "max_new_tokens": 1 if teacher_forced else max_new_tokens,
            "seed": seed,
            "per_shard": per_shard,
            "copy_layers": sorted(copy_layers),
            "prompts": len(prompts),
            "prompts_sha256": _digest(prompts),
        }
        grown = check_source(out, record, write=generate, prefix_sha256=lambda n: _digest(prompts[:n]))
        if grown and grown % per_shard:  # the old last shard was partial: write it again, complete
            (out / f"shard_{grown // per_shard:05d}.safetensors").unlink(missing_ok=True)
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


def _digest(prompts: list) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()


SOURCE = "source.json"
"""The record beside a folder's shards of what wrote them (`write_shards`'s `source`)."""

IDENTITY = ("model_file", "hidden_size", "vocab_size", "num_layers")
"""Record fields that name the target: shards of another target do not fit its drafter."""


SETTINGS = ("max_new_tokens", "seed", "per_shard")
"""Record fields beside the flags that shape the generated data."""


def _same_target(old: dict, new: dict) -> bool:
    return not any(old.get(k) != new.get(k) for k in IDENTITY if k in old and k in new)


def _target(rec: dict) -> str:
    return f"{rec.get('model', 'a target')} (hidden {rec['hidden_size']}, vocabulary {rec['vocab_size']})"


def _grows(old: dict, new: dict, prefix_sha256) -> bool:
    """Whether `new` only asks for more of the same data: more --tokens (or --corpus-tokens), and the
    old prompts are the first of the new ones. Generated data then grows (the documented way to
    add data); teacher-forced texts shift with --tokens, but any text the target read is valid."""
    if not _same_target(old, new) or old.get("teacher_forced") != new["teacher_forced"]:
        return False
    size = {"tokens", "corpus-tokens"}
    flags, old_flags = new.get("flags", {}), old.get("flags", {})
    if any(old_flags.get(k) != v for k, v in flags.items() if k not in size and k in old_flags):
        return False
    if any(old.get(k) != new[k] for k in SETTINGS):
        return False
    if not set(new["copy_layers"]) <= set(old.get("copy_layers", [])):
        return False
    if new["teacher_forced"]:
        return True
    n = old.get("prompts", 0)
    return 0 < n < new["prompts"] and prefix_sha256 is not None and prefix_sha256(n) == old.get("prompts_sha256")


def _mismatch(old: dict, new: dict, out: Path) -> str | None:
    """Why the shards in `out`, written as `old` records, must not be used as `new` asks (None:
    they may)."""
    if not _same_target(old, new):
        return f"{out} was generated for {_target(old)}, not {_target(new)}: use another --out (or --data-dir)"
    again = "rerun with those flags, or use another --out (or --data-dir)"
    if old.get("teacher_forced") != new["teacher_forced"]:
        kinds = ("generated", "teacher-forced")
        was, now = kinds[bool(old.get("teacher_forced"))], kinds[new["teacher_forced"]]
        return f"{out} holds {was} shards, not {now} ones: give another --data-dir"
    flags, old_flags = new.get("flags", {}), old.get("flags", {})
    if changed := [k for k in flags if k in old_flags and old_flags[k] != flags[k]]:
        was = " ".join(f"--{k} {old_flags[k]}" for k in changed)
        return f"{out} was generated with {was}, not {' '.join(f'--{k} {flags[k]}' for k in changed)}: {again}"
    if changed := [k for k in SETTINGS if old.get(k) != new[k]]:
        k = changed[0]
        return f"{out} was generated with {k} {old.get(k)}, not {new[k]}: {again}"
    if old.get("prompts_sha256") != new["prompts_sha256"]:
        # the same flags but other prompts: the data changed (a moved file that did not is fine)
        files = f", from {old.get('data')}, not {new.get('data')}" if old.get("data") != new.get("data") else ""
        return (
            f"{out} was generated from other prompts ({old.get('prompts')}, not {new['prompts']}{files}): "
            "use another --out (or --data-dir)"
        )
    if lacking := sorted(set(new["copy_layers"]) - set(old.get("copy_layers", []))):
        return (
            f"{out} lacks the K/V of copy layers {lacking} (it has {old.get('copy_layers')}): "
            "use another --out (or --data-dir)"
        )
    return None


def check_source(out: Path, record: dict, write: bool = True, prefix_sha256=None) -> int:
    """Refuse shards in `out` that were written for another target or other settings than
    `record` says; with `write`, record it when `out` has no shards yet. A folder written before
    records existed is checked by the width of its hidden states only. Data that only grows (see
    `_grows`; `prefix_sha256(n)` digests the first n prompts) is accepted and its record updated:
    returns the old prompt count then, else 0."""
    from safetensors import SafetensorError, safe_open

    path = out / SOURCE
    shards = sorted(out.glob("shard_*.safetensors"))
    old = None
    if path.exists():
        try:
            old = json.loads(path.read_text())
            if not isinstance(old, dict) or not all(k in old for k in ("hidden_size", "vocab_size")):
                raise ValueError("not a record of aheadlm's")
        except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise InvalidRequestError(
                f"{path} is unreadable ({e}): delete it to check the shards by shape only"
            ) from None
    if shards and old is not None:
        why = _mismatch(old, record, out)
        if why and _grows(old, record, prefix_sha256):
            status(f"{out}: adding to the shards written with {old.get('prompts')} prompts")
            if write:
                _write_record(path, record)
            return old.get("prompts", 0) if not record["teacher_forced"] else 0
        if why:
            raise InvalidRequestError(why)
        return 0
    if shards:
        try:
            with safe_open(str(shards[0]), "pt") as f:
                width = f.get_slice("hidden").get_shape()[-1]
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{shards[0]}: unreadable data shard ({e}); delete it to regenerate") from None
        if width != record["hidden_size"]:
            raise InvalidRequestError(
                f"{out} holds shards of a target with hidden size {width}, not {_target(record)}: use another --out"
            )
        status(f"{out}: no record of what generated these shards (an older aheadlm); using them as they are")
        return 0
    if write:
        _write_record(path, record)
    return 0


def _write_record(path: Path, record: dict) -> None:
    # written whole, then renamed: a killed run must not leave half a record
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


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
