"""lm-eval's `local-completions` model against `aheadlm serve`: the log-likelihoods it computes
for (context, continuation) pairs must equal the sums of `LLM.score` in this process.

    pip install lm-eval aiohttp tenacity     # not a dependency of aheadlm
    python scripts/lm_eval_check.py --model smollm2-135m

lm-eval tokenizes with a Hugging Face tokenizer, so the model's tokenizer is saved to a folder for
it first; it then posts token ids with `echo`, `logprobs: 1` and `max_tokens: 1`, and sums the
prompt log-probabilities of the continuation (`docs/server.md`, "Scoring prompts").
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx

import aheadlm

PAIRS = [
    ("The capital of France is", " Paris"),
    ("The capital of France is", " Berlin"),
    ("Question: What is 2 + 2?\nAnswer:", " 4"),
    ("Question: What is 2 + 2?\nAnswer:", " five apples"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    a = ap.parse_args()
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    llm = aheadlm.load(a.model, drafter="none")
    tokdir = tempfile.mkdtemp(prefix="aheadlm-tokenizer-")
    llm.tokenizer.save(tokdir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "aheadlm.cli", "serve", "-m", a.model, "--port", str(port), "--n-ctx", "1024"]
    server = subprocess.Popen(cmd, env={**os.environ, "AHEADLM_QUIET": "1"}, stdout=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        lm = LocalCompletionsAPI(
            base_url=f"http://127.0.0.1:{port}/v1/completions",
            model=a.model,
            tokenizer=tokdir,
            tokenizer_backend="huggingface",
            tokenized_requests=True,
            max_length=1024,
            add_bos_token=llm.tokenizer.add_bos,
        )
        got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(PAIRS)], disable_tqdm=True)
        ok = True
        for (ctx, cont), (ll, greedy) in zip(PAIRS, got, strict=True):
            n_ctx = len(llm.tokenizer.encode(ctx))
            scored = llm.score(ctx + cont, logprobs=1)[n_ctx - 1 :]
            want = sum(x.logprob for x in scored)
            want_greedy = all(x.top[0][0] == x.token_id for x in scored)
            ok &= math.isclose(ll, want, abs_tol=1e-9) and greedy == want_greedy
            print(f"{ctx!r} + {cont!r}: lm-eval {ll:.6f} (greedy {greedy}), ", end="")
            print(f"LLM.score {want:.6f} (greedy {want_greedy})")
        print("lm-eval agrees with LLM.score" if ok else "MISMATCH")
        sys.exit(0 if ok else 1)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
