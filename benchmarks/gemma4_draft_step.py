"""Gemma 4 assistant draft step vs target step on random-weight E2B- / E4B-shaped models (CPU).

    python benchmarks/gemma4_draft_step.py --shape e2b --json docs/results/gemma4_e2b_draft_step.json

No Gemma 4 weights can be downloaded here, and speed does not depend on weight values, so the
target and its assistant are built from the published shapes (config.json values below) with random
bf16 weights, packed as a bf16 Hugging Face folder would load. The per-layer-embedding table
(262144 x layers*256, 4.7-5.6 GB) is one shared random row broadcast over the vocabulary: a forward
reads only the rows of its tokens, so its cost is the same. Times (median of `--reps`): one target
decode step, one verification of k + 1 tokens, one assistant step with its centroid head (top-32 of
2048 clusters, 4096 candidates) and with a dense tied head over all 262144 tokens.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from draft_step import report, time_steps  # a sibling script (benchmarks/ is on sys.path when run)

from aheadlm.checkpoint import build_model
from aheadlm.config import from_hf_config
from aheadlm.drafter import MTPDrafter, pack_linears
from aheadlm.gemma4_assistant import assistant_config
from aheadlm.kv_cache import KVCache
from aheadlm.model import Transformer

ROPE = {
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
}
COMMON = dict(
    model_type="gemma4_text",
    vocab_size=262144,
    head_dim=256,
    global_head_dim=512,
    num_attention_heads=8,
    sliding_window=512,
    final_logit_softcapping=30.0,
    hidden_size_per_layer_input=256,
    vocab_size_per_layer_input=262144,
    rope_parameters=ROPE,
    max_position_embeddings=131072,
)
TARGETS = {  # google/gemma-4-{E2B,E4B}-it text_config (docs/gemma4.md lists the sources)
    "e2b": dict(
        COMMON,
        hidden_size=1536,
        intermediate_size=6144,
        num_hidden_layers=35,
        num_key_value_heads=1,
        num_kv_shared_layers=20,
        use_double_wide_mlp=True,
        layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 7,
    ),
    "e4b": dict(
        COMMON,
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=42,
        num_key_value_heads=2,
        num_kv_shared_layers=18,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 7,
    ),
}


def assistant(shape: str) -> dict:
    t = TARGETS[shape]
    return {
        "model_type": "gemma4_assistant",
        "backbone_hidden_size": t["hidden_size"],
        "use_ordered_embeddings": True,
        "num_centroids": 2048,
        "centroid_intermediate_top_k": 32,
        "text_config": dict(
            COMMON,
            hidden_size=256,
            intermediate_size=2048,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=t["num_key_value_heads"],
            layer_types=["sliding_attention"] * 3 + ["full_attention"],
            num_kv_shared_layers=4,
            hidden_size_per_layer_input=0,
            vocab_size_per_layer_input=0,
            final_logit_softcapping=None,
        ),
    }


def random_target(shape: str) -> Transformer:
    config = from_hf_config(TARGETS[shape])
    with torch.device("meta"):
        names = {k: tuple(v.shape) for k, v in Transformer(config).state_dict().items()}
    g = torch.Generator().manual_seed(0)

    def tensors():
        for name, shape_ in names.items():
            if name == "embed_per_layer.weight":
                continue
            if name.endswith("norm.weight") or name.endswith("layer_scalar"):
                yield name, torch.ones(shape_)
            else:
                yield name, (torch.randn(shape_, generator=g) * 0.02).to(torch.bfloat16)

    # build_model requires every tensor: give the PLE table a placeholder, then swap in the broadcast one
    ple = names["embed_per_layer.weight"]
    model = build_model(config, [*tensors(), ("embed_per_layer.weight", torch.zeros(1, ple[1]).expand(ple))])
    model.embed_per_layer.weight.data = (torch.randn(1, ple[1], generator=g) * 0.02).expand(ple)
    return model


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(TARGETS), default="e2b")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    t0 = time.time()
    target = random_target(a.shape)
    build_s = time.time() - t0
    cfg = target.config
    ids = torch.randint(0, 262144, (a.context,), generator=torch.Generator().manual_seed(1)).tolist()
    cache = KVCache(cfg, a.context + 64, max_step=64)
    hidden = None
    for s in range(0, a.context, 64):  # prefill in chunks
        _, hidden = target(torch.tensor([ids[s : s + 64]]), torch.arange(s, min(s + 64, a.context))[None], cache)

    dcfg = assistant_config(assistant(a.shape), cfg)
    centroid = MTPDrafter(dcfg).init_weights(0.02, torch.Generator().manual_seed(2)).eval()
    centroid.token_ordering = torch.randperm(262144, generator=torch.Generator().manual_seed(3))
    pack_linears(centroid)  # the published assistants are bf16
    dense = copy.copy(centroid)  # the same weights ...
    dense._modules = dict(centroid._modules)
    dense.centroids = None  # ... scoring the whole tied table
    rows = time_steps(target, cache, ids, hidden, {"centroid": centroid, "dense": dense}, a.k, a.reps, a.reps * 4)
    out = {
        "shape": a.shape,
        "target_params": cfg.num_params,
        "drafter_params": sum(p.numel() for p in centroid.state_dict().values()),
        "context": a.context,
        "threads": torch.get_num_threads(),
        "build_seconds": round(build_s, 1),
        **rows,
    }
    report(out, a.json, digits=4)


if __name__ == "__main__":
    main()
