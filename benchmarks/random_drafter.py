"""Random-weight MTP drafter folders of chosen shapes, for timing only (a step's cost does not
depend on the weights' values), so a shape can be priced before a drafter of it is trained.

    python benchmarks/random_drafter.py --model smollm2-135m --out /tmp/rd --shapes 2x1536 1x1536 2x768
    python benchmarks/draft_step.py --model smollm2-135m --k 2 --drafter /tmp/rd/l2_1536 /tmp/rd/l1_1536 ...

Each shape is LAYERSxMLP at width `--hidden`, with a clustered head of `--centroids` clusters (from
the target's output embeddings, as training makes them), stored like a trained folder (`--int8`
matrices by default). Its `training.json` says the weights are random.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from aheadlm.api import load
from aheadlm.drafter import DrafterConfig, MTPDrafter, save_drafter
from aheadlm.train.clusters import balanced_clusters, use_clusters
from aheadlm.train.trainer import Tables


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", nargs="+", default=["2x1536"], help="LAYERSxMLP, e.g. 2x1536")
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--centroids", type=int, default=512)
    ap.add_argument("--centroid-top-k", type=int, default=16)
    ap.add_argument("--bf16", action="store_true", help="bf16 matrices instead of int8")
    a = ap.parse_args()

    target = load(a.model, drafter="none").engine.model
    tables = Tables.from_model(target)
    ordering, cent = balanced_clusters(tables.head, a.centroids, seed=0)
    for shape in a.shapes:
        layers, mlp = (int(x) for x in shape.split("x"))
        cfg = DrafterConfig.for_target(
            target.config,
            hidden_size=a.hidden,
            intermediate_size=mlp,
            num_layers=layers,
            num_heads=target.config.num_heads,
            num_centroids=a.centroids,
            centroid_top_k=a.centroid_top_k,
        )
        drafter = MTPDrafter(cfg).init_weights(0.02, torch.Generator().manual_seed(0))
        use_clusters(drafter, tables, ordering, cent)
        out = Path(a.out) / f"l{layers}_{mlp}"
        save_drafter(drafter, out, {"target": a.model, "note": "random weights, for timing only"}, int8=not a.bf16)
        print(out)


if __name__ == "__main__":
    main()
