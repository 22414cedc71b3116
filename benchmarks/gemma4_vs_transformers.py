"""Decode step of a random-weight E2B-shaped Gemma 4 target and of its assistant: aheadlm against
transformers, same bf16 weights, CPU.

    python benchmarks/gemma4_vs_transformers.py --json docs/results/gemma4_e2b_vs_transformers.json

transformers builds the model in bf16 (its per-layer-embedding table is real here, 4.7 GB); aheadlm
loads the same tensors (its packed bf16 matrices share their memory). Both prefill the same
256-token context, then time single-token decode steps (median of `--reps`, the cache growing by
one token per step), and one assistant draft step over the target's K/V.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from draft_step import median_ms, report  # noqa: E402
from gemma4_draft_step import TARGETS, assistant  # noqa: E402

from aheadlm.checkpoint import build_model, hf_state_dict  # noqa: E402
from aheadlm.config import from_hf_config  # noqa: E402
from aheadlm.drafter import MTPDrafter, pack_linears  # noqa: E402
from aheadlm.gemma4_assistant import assistant_config, assistant_state  # noqa: E402
from aheadlm.kv_cache import KVCache  # noqa: E402


@torch.inference_mode()
def main() -> None:
    from transformers import (
        DynamicCache,
        Gemma4AssistantConfig,
        Gemma4AssistantForCausalLM,
        Gemma4ForCausalLM,
        Gemma4TextConfig,
    )

    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    raw = {k: v for k, v in TARGETS["e2b"].items() if k != "model_type"}
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    hf = Gemma4ForCausalLM(Gemma4TextConfig(**raw)).eval()
    araw = assistant("e2b")
    text = {k: v for k, v in araw["text_config"].items() if k != "model_type"}
    hf_asst = Gemma4AssistantForCausalLM(
        Gemma4AssistantConfig(**{**araw, "text_config": Gemma4TextConfig(**text)})
    ).eval()
    hf_asst.masked_embedding.token_ordering.copy_(torch.randperm(262144))
    torch.set_default_dtype(torch.float32)

    config = from_hf_config(TARGETS["e2b"])
    ours = build_model(config, hf_state_dict(hf.state_dict().items(), config))
    dcfg = assistant_config(araw, config)
    state, _ = assistant_state(hf_asst.state_dict().items(), dcfg)
    with torch.device("meta"):
        drafter = MTPDrafter(dcfg)
    drafter.load_state_dict(state, assign=True)
    pack_linears(drafter)

    ids = torch.randint(0, 262144, (1, a.context), generator=torch.Generator().manual_seed(1))
    # transformers
    cache = DynamicCache(config=hf.config)
    out = hf(ids, past_key_values=cache, use_cache=True, output_hidden_states=True, return_shared_kv_states=True)
    pos = [a.context]

    def hf_step():
        hf(torch.tensor([[5]]), past_key_values=cache, use_cache=True, position_ids=torch.tensor([[pos[0]]]))
        pos[0] += 1

    hf_decode = median_ms(hf_step, a.reps)
    h, kv = out.hidden_states[-1][:, -1:], dict(out.shared_kv_states)
    emb = hf.get_input_embeddings()

    def hf_draft():
        o = hf_asst(
            inputs_embeds=torch.cat([emb(torch.tensor([[7]])), h], -1),
            position_ids=torch.tensor([[a.context]]),
            shared_kv_states=kv,
            use_cache=False,
        )
        int(o.logits.argmax())

    hf_draft_ms = median_ms(hf_draft, a.reps * 4)
    # aheadlm
    kvc = KVCache(config, a.context + 64, max_step=64)
    hidden = None
    for s in range(0, a.context, 64):
        _, hidden = ours(ids[:, s : s + 64], torch.arange(s, s + 64)[None], kvc)
    n = [a.context]

    def our_step():
        ours(torch.tensor([[5]]), torch.tensor([[n[0]]]), kvc)
        n[0] += 1

    our_decode = median_ms(our_step, a.reps)
    kvc.trim(a.context)
    ctx = drafter.round_context(ours, kvc, torch.tensor([a.context]))
    hh = hidden[:, -1]

    def our_draft():
        head_in, _ = drafter.step(ours, torch.tensor([7]), hh, ctx)
        ids_, s = drafter.scores(ours, head_in[0])
        int(s.argmax())

    our_draft_ms = median_ms(our_draft, a.reps * 4)
    res = {
        "shape": "e2b",
        "context": a.context,
        "threads": torch.get_num_threads(),
        "transformers_decode_ms": hf_decode,
        "aheadlm_decode_ms": our_decode,
        "decode_speedup": hf_decode / our_decode,
        "transformers_draft_step_ms": hf_draft_ms,
        "aheadlm_draft_step_ms": our_draft_ms,
        "draft_speedup": hf_draft_ms / our_draft_ms,
    }
    report(res, a.json)


if __name__ == "__main__":
    main()
