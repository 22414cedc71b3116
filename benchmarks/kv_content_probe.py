"""What each target layer's cached K and V say about the tokens around them.

    python benchmarks/kv_content_probe.py --model gemma3-270m --json out.json

An MTP drafter reads the target's cached K/V and nothing else from the context, so copying earlier
text (the target repeating itself, which n-gram lookup exploits) needs keys that identify a token
and values that tell what followed it. For every layer this fits a ridge map from K (or V) at
position i to the unit input embedding of the token at i + shift, on teacher-forced ShareGPT
conversations, and scores held-out positions by retrieval: the share of positions where the
predicted vector is closest to the right token among the distinct tokens of that sequence (the
choice attention over the context has). shift -1 is the previous token, 0 the token itself, +1 the
next one.
"""

from __future__ import annotations

import argparse
import json
import random

import torch

import aheadlm
from aheadlm.batch import generate_batch
from aheadlm.train.data import corpus_sequences, load_conversations

PROBES = (("K", 0, -1), ("K", 0, 0), ("V", 1, 0), ("V", 1, 1))
"""(name, index in the cached (K, V) pair, token shift)."""


def pairs(rows, layer: int, which: int, shift: int):
    """Per sequence: the cached K or V rows and the token ids they are probed for, aligned."""
    out = []
    for r in rows:
        x = r.kv[layer][which].float()
        ids = torch.tensor(r.prompt + r.tokens)
        n = x.shape[0]
        lo, hi = max(0, -shift), min(n, len(ids) - shift)  # positions i with i + shift in range
        out.append((x[lo:hi], ids[lo + shift : hi + shift]))
    return out


def retrieval(W: torch.Tensor, test, unit_embed: torch.Tensor) -> float:
    hits = total = 0
    for x, ids in test:
        cand = torch.unique(ids)
        pick = cand[(x @ W @ unit_embed[cand].T).argmax(-1)]
        hits += int((pick == ids).sum())
        total += len(ids)
    return hits / max(total, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--conversations", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=12_000)
    ap.add_argument("--max-len", type=int, default=400)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    llm = aheadlm.load(a.model, drafter="none")
    model = llm.engine.model
    items = load_conversations(None)
    random.Random(1).shuffle(items)
    # far from the first conversations after shuffling, which training scripts use as prompts
    texts = corpus_sequences(llm.tokenizer, items[5000 : 5000 + a.conversations], tokens=a.tokens, max_len=a.max_len)
    layers = tuple(range(model.config.num_layers))
    rows = generate_batch(model, texts, max_tokens=1, temperatures=[0.0] * len(texts), capture_layers=layers)
    embed = model.embed_tokens(torch.arange(model.config.vocab_size)[None])[0].float()
    unit = embed / embed.norm(dim=-1, keepdim=True)
    n_train = int(0.7 * len(rows))
    result = {"model": a.model, "positions": sum(r.kv[0][0].shape[0] for r in rows), "layers": []}
    for layer in layers:
        scores = {}
        for name, which, shift in PROBES:
            train = pairs(rows[:n_train], layer, which, shift)
            X = torch.cat([x for x, _ in train])
            Y = unit[torch.cat([i for _, i in train])]
            gram = X.T @ X + 1e-2 * len(X) * X.pow(2).mean() * torch.eye(X.shape[1])
            W = torch.linalg.solve(gram, X.T @ Y)
            test = pairs(rows[n_train:], layer, which, shift)
            scores[f"{name}->x[i{shift:+d}]".replace("+0", "")] = retrieval(W, test, unit)
        result["layers"].append({"layer": layer, "type": model.config.layer_types[layer], **scores})
        print(layer, model.config.layer_types[layer], "  ".join(f"{k} {v:.2f}" for k, v in scores.items()), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
