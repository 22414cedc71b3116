"""Plain greedy decode speed: aheadlm vs transformers vs llama-cpp-python on the same GGUF.

    python benchmarks/decode_speed.py --model gemma3-270m --tokens 64 --runs 3 --json out.json

Every engine decodes the same prompt greedily for exactly `--tokens` tokens; runs are interleaved
(engine A, B, C, A, B, C, ...) and the median decode tokens/s (prefill excluded) is reported, with
ratios against transformers in the same run. llama-cpp-python is optional (`--llama-cpp`); it must
be importable (its default build needs use_extra_bufts=False on AMX CPUs, see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

PROMPT = "The history of the printing press begins"


def aheadlm_runner(model: str, dtype: str, packed: bool, compiled: bool = True, nibbles: bool = True):
    import aheadlm
    from aheadlm.checkpoint import build_model, load_checkpoint
    from aheadlm.engine import Engine, GenerationStats
    from aheadlm.registry import resolve

    config, tensors, tok = load_checkpoint(resolve(model))
    net = build_model(config, tensors, dtype=aheadlm.api.resolve_dtype(dtype), packed=packed, nibbles=nibbles)
    if not compiled:  # the per-op path the compiled layers replace (same kernels, bit-identical)
        for block in net.layers:
            block.compiled = None
    engine = Engine(net)
    ids = tok.encode(PROMPT)

    def run(n):
        stats = GenerationStats()
        out = [s.token_ids for s in engine.generate(ids, max_tokens=n, stats=stats)]
        assert sum(len(t) for t in out) == n
        # decode_s covers the n - 1 forwards after prefill (plus picking the first token)
        return (n - 1) / stats.decode_s, [t for ts in out for t in ts]

    return run


def transformers_runner(model: str, dtype: str):
    from transformers import AutoModelForCausalLM

    from aheadlm.registry import cache_dir, resolve

    ref = cache_dir() / "hf-reference" / model
    if not ref.exists():
        raise SystemExit(f"run the test suite once first (it caches transformers' copy in {ref})")
    m = AutoModelForCausalLM.from_pretrained(str(ref), dtype=getattr(torch, dtype)).eval()
    from aheadlm.checkpoint import load_checkpoint

    _, _, tok = load_checkpoint(resolve(model))
    ids = torch.tensor([tok.encode(PROMPT)])

    @torch.inference_mode()
    def run(n):
        # Manual KV-cache loop: prefill, then one token per forward (what generate() does inside).
        out = m(ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        toks = [int(nxt)]
        t0 = time.perf_counter()
        for _ in range(n - 1):
            out = m(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(int(nxt))
        return (n - 1) / (time.perf_counter() - t0), toks

    return run


def llama_cpp_runner(model: str):
    import llama_cpp

    from aheadlm.registry import resolve

    base = llama_cpp.llama_model_default_params

    def params():  # ggml's AMX path faults on some VMs; llama-cpp-python does not expose this flag
        p = base()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = False
        return p

    llama_cpp.llama_model_default_params = params
    llm = llama_cpp.Llama(
        str(resolve(model)),
        n_threads=torch.get_num_threads(),
        n_threads_batch=torch.get_num_threads(),
        n_ctx=1024,
        verbose=False,
    )
    ids = llm.tokenize(PROMPT.encode(), add_bos=True)

    def run(n):
        llm.reset()
        llm.eval(ids)
        toks, t0 = [], None
        for _ in range(n):
            tok = int(llm.scores[llm.n_tokens - 1].argmax())
            toks.append(tok)
            if t0 is None:
                t0 = time.perf_counter()
            if len(toks) < n:
                llm.eval([tok])
        return (n - 1) / (time.perf_counter() - t0), toks

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-cpp", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    engines = {
        "aheadlm float32 (packed)": aheadlm_runner(a.model, "float32", True),
        "aheadlm float32 (packed, int8 blocks)": aheadlm_runner(a.model, "float32", True, nibbles=False),
        "aheadlm float32 (packed, per-op layers)": aheadlm_runner(a.model, "float32", True, compiled=False),
        # the engine before compiled layers and 4-bit blocks (2026-11-30 morning): same tokens
        "aheadlm float32 (packed, int8, per-op)": aheadlm_runner(a.model, "float32", True, False, False),
        "aheadlm float32 (dense)": aheadlm_runner(a.model, "float32", False),
        "aheadlm bfloat16": aheadlm_runner(a.model, "bfloat16", False),
        "transformers float32": transformers_runner(a.model, "float32"),
        "transformers bfloat16": transformers_runner(a.model, "bfloat16"),
    }
    if a.llama_cpp:
        engines["llama.cpp (GGUF as is)"] = llama_cpp_runner(a.model)
    speeds = {k: [] for k in engines}
    tokens = {}
    for name, run in engines.items():  # warm-up
        tokens[name] = run(8)[1]
    for _ in range(a.runs):
        for name, run in engines.items():
            tps, toks = run(a.tokens)
            speeds[name].append(tps)
            tokens[name] = toks
    base = {
        "float32": statistics.median(speeds["transformers float32"]),
        "bfloat16": statistics.median(speeds["transformers bfloat16"]),
    }
    rows = []
    ref = tokens["transformers float32"]
    for name, s in speeds.items():
        med = statistics.median(s)
        row = {
            "engine": name,
            "tokens_per_s": round(med, 2),
            "runs": [round(x, 2) for x in s],
            "vs_transformers_float32": round(med / base["float32"], 2),
            "vs_transformers_bfloat16": round(med / base["bfloat16"], 2),
            "same_tokens_as_transformers_float32": tokens[name] == ref,
        }
        rows.append(row)
        print(
            f"{name:<40} {med:7.2f} tok/s  x{row['vs_transformers_float32']:.2f} vs HF fp32  "
            f"x{row['vs_transformers_bfloat16']:.2f} vs HF bf16  "
            f"same tokens: {row['same_tokens_as_transformers_float32']}"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "tokens": a.tokens, "threads": a.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
