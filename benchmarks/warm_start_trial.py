"""Warm start vs random initialisation of an MTP drafter: a short training trial on the same data.

    python benchmarks/warm_start_trial.py --data-dir runs/distill-gemma3-270m \
        --clusters runs/gemma3-drafter-tf/clusters.pt --steps 150 --json out.json

Both drafters get the target's width and MLP size (what warm start needs), train on the same
shards in the same order for `--steps` steps of a schedule spanning `--schedule` steps, and are
scored every 50 steps on 12 teacher-forced conversations held out from training: per depth, how often the
drafter's choice among the training candidates (the sequence's tokens plus random negatives) is the
target's own likeliest one.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from draft_step import report  # a sibling script (benchmarks/ is on sys.path when run)

from aheadlm import api
from aheadlm.drafter import DrafterConfig, MTPDrafter
from aheadlm.train.clusters import use_clusters
from aheadlm.train.distill import load_shard
from aheadlm.train.trainer import Tables, TrainConfig, sequence_loss, train
from aheadlm.train.warm_start import warm_start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--data-dir", required=True, help="shards written by train-drafter (with corpus/)")
    p.add_argument("--clusters", default=None, help="clusters.pt of an earlier run (clustered head)")
    p.add_argument("--centroids", type=int, default=1024)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--schedule", type=int, default=1600)
    p.add_argument("--json", default=None)
    a = p.parse_args()

    llm = api.load(a.model, drafter="none")
    target = llm.engine.model
    tc = target.config
    root = Path(a.data_dir)
    corpus = sorted((root / "corpus").glob("shard_*.safetensors"))
    # one teacher-forced shard gives the held-out conversations and those the warm start is fitted
    # on; training uses four generated and three other teacher-forced shards
    spare = load_shard(corpus[3])
    random.Random(0).shuffle(spare)
    held, fit = spare[-12:], spare[:30]
    seqs = [s for path in sorted(root.glob("shard_*.safetensors"))[:4] + corpus[4:7] for s in load_shard(path)]
    tables = Tables.from_model(target)

    def new_drafter() -> MTPDrafter:
        cfg = DrafterConfig.for_target(
            tc,
            hidden_size=tc.hidden_size,
            intermediate_size=tc.intermediate_size,
            num_layers=1,
            num_centroids=a.centroids if a.clusters else 0,
            centroid_top_k=16,
        )
        d = MTPDrafter(cfg).init_weights(0.02, torch.Generator().manual_seed(0))
        if a.clusters:
            use_clusters(d, tables, *torch.load(a.clusters))
        return d

    cfg = TrainConfig(steps=a.schedule, depth=4, max_anchors=256, checkpoint_every=50, eval_every=0)

    def score(d: MTPDrafter) -> dict:
        acc: dict[str, float] = {}
        rng = random.Random(0)
        d.eval()
        with torch.no_grad():
            for s in held:
                _, m, _ = sequence_loss(d, d, tables, s, cfg, rng, "cpu")
                for k, v in m.items():
                    if k.startswith("acc"):
                        acc[k] = acc.get(k, 0.0) + v / len(held)
        return {k: round(v, 3) for k, v in acc.items()}

    result = {}
    for init, lr in (("target", 3e-4), ("random", 1e-3)):
        d = new_drafter()
        if init == "target":
            warm_start(d, target, [s.tokens[:-1].tolist() for s in fit], max_positions=100_000)
        curve, t0 = [{"step": 0, **score(d)}], time.time()
        with tempfile.TemporaryDirectory() as out:
            for stop in range(50, a.steps + 1, 50):
                d.train()
                train(d, tables, seqs, replace(cfg, lr=lr), Path(out), resume=stop > 50, until=stop)
                curve.append({"step": stop, **score(d)})
                print(init, curve[-1], f"{time.time() - t0:.0f} s", flush=True)
        result[init] = {"lr": lr, "curve": curve}
    report(result, a.json)


if __name__ == "__main__":
    main()
