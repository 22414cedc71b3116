"""Compiled layers against the per-op path: one target forward of 1 row (a decode step) and of
k + 1 rows (a verification), and one MTP draft step (`MTPDrafter.step`: embedding to next hidden
state, without the head), at a fixed context, alternating the paths.

    python benchmarks/layer_paths.py --model gemma3-270m --drafter src/aheadlm/drafters/gemma3-270m --json out.json

Both paths run the same kernels (`aheadlm/fused.py`); the script checks that their logits and
drafts are bit-identical, then reports the median milliseconds of each over `--rounds` alternating
rounds of `--reps` calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import aheadlm
from aheadlm.kernels import kernel_build
from aheadlm.kv_cache import KVCache


def use_compiled(model, drafter, compiled, on: bool) -> None:
    for layer, c in zip(list(model.layers) + list(drafter.layers if drafter else []), compiled, strict=True):
        layer.compiled = c if on else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--drafter", default=None, help="an MTP drafter folder (omit: no draft step timed)")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--rows", type=int, default=5, help="rows of the verification forward (k + 1)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(2)

    llm = aheadlm.load(a.model, drafter=a.drafter or "none")
    model = llm.engine.model
    proposer = llm.engine.proposer
    drafter = proposer.drafter if a.drafter else None
    compiled = [layer.compiled for layer in list(model.layers) + list(drafter.layers if drafter else [])]
    if not all(c is not None for c in compiled):
        raise SystemExit("some layers are not compiled (no kernels, or unpacked weights)")
    g = torch.Generator().manual_seed(0)
    ctx_ids = torch.randint(0, model.config.vocab_size, (1, a.context), generator=g)

    @torch.inference_mode()
    def measure(on: bool):
        use_compiled(model, drafter, compiled, on)
        cache = KVCache(model.config, a.context + (a.reps + 1) * (a.rows + 1) + 8)
        _, hidden = model(ctx_ids, torch.arange(a.context)[None], cache)
        out, p = {}, a.context
        for name, rows in (("decode_ms", 1), ("verify_ms", a.rows)):
            logits, t0 = [], time.perf_counter()
            for _ in range(a.reps):
                lg, _ = model(ctx_ids[:, :rows], torch.arange(p, p + rows)[None], cache, num_logits=rows)
                if len(logits) < 3:  # kept for the identity check; keeping all would time fresh pages
                    logits.append(lg)
                p += rows
            out[name] = 1000 * (time.perf_counter() - t0) / a.reps
            out[name.replace("_ms", "_logits")] = logits
        if drafter is not None:
            ctx = drafter.round_context(model, cache, torch.tensor([p - 1]))
            tok, h = torch.tensor([int(ctx_ids[0, 0])]), hidden[:, -1]
            drafts, t0 = [], time.perf_counter()
            for _ in range(a.reps):
                head_in, h = drafter.step(model, tok, h, ctx)
                drafts.append(head_in)
            out["draft_step_ms"] = 1000 * (time.perf_counter() - t0) / a.reps
            out["draft_logits"] = drafts
        return out

    times = {True: [], False: []}
    ref = {on: measure(on) for on in (False, True)}  # warm-up, and the identity check
    same = all(
        torch.equal(x, y)
        for key in ref[True]
        if not key.endswith("_ms")
        for x, y in zip(ref[False][key], ref[True][key], strict=True)
    )
    for _ in range(a.rounds):
        for on in (False, True):
            times[on].append(measure(on))
    result = {"model": a.model, "drafter": a.drafter, "context": a.context, "rows": a.rows, "kernels": kernel_build()}
    result["bit_identical"] = same
    for on, label in ((False, "per_op"), (True, "compiled")):
        for key in [k for k in times[on][0] if k.endswith("_ms")]:
            result[f"{label}_{key}"] = round(statistics.median(t[key] for t in times[on]), 3)
    print(json.dumps(result, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
