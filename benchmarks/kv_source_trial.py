"""Trial: which target layer's K/V should the drafter's full-attention layer read?

    python benchmarks/kv_source_trial.py data --layer 5 --source runs/distill-gemma3-270m --out runs/trial-kv5
    python benchmarks/kv_source_trial.py train --layer 5 --data runs/trial-kv5 --out runs/trial-B5 --steps 400
    python benchmarks/kv_source_trial.py rounds --layer 5 --drafter runs/trial-B5 --limit 1 --max-tokens 128

A drafter reads the K/V of the target's last layer of each type, as Gemma 4's do. Copying earlier
text needs keys that name a token, and `kv_content_probe.py` finds the last layers' keys name their
neighbours worse than some earlier layers' do (layer 5 best for the previous token). This script
tests that lever without changing the product: within its own process it points the `full` layer
type at `--layer` (the drafter, training and speculative rounds all ask
`ModelConfig.last_layer_of`), then

- `data` copies the first `--shards` self-distillation and teacher-forced shards of a data folder
  with their `full` K/V recomputed from that layer (one prefill of the stored tokens each);
- `train` trains a two-layer drafter on them as `aheadlm train-drafter --layers 2 --init target`
  does (the full layer starts as a copy of `--layer`), with the clusters of an existing run;
- `rounds` runs `copy_rounds.py` on the result.

With `--layer 17` (the default) it is the unchanged drafter, the baseline.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import time
from pathlib import Path

import torch

from aheadlm.config import FULL, ModelConfig


def point_full_layer(layer: int) -> None:
    """Within this process, make `layer` the full-attention layer a drafter reads."""
    last = ModelConfig.last_layer_of
    ModelConfig.last_layer_of = lambda self, t: layer if t == FULL else last(self, t)


def recompute(a) -> None:
    import aheadlm
    from aheadlm.batch import generate_batch
    from aheadlm.train.distill import Sequence, load_shard, save_shard

    model = aheadlm.load(a.model, drafter="none").engine.model
    names = [f"shard_{i:05d}.safetensors" for i in range(a.shards)]
    for sub in ("", "corpus"):
        (Path(a.out) / sub).mkdir(parents=True, exist_ok=True)
        for name in names:
            src, dst = Path(a.source) / sub / name, Path(a.out) / sub / name
            if dst.exists() or not src.exists():
                continue
            t0, seqs, new = time.time(), load_shard(src), []
            for i in range(0, len(seqs), 16):
                batch = seqs[i : i + 16]
                prompts = [s.tokens[: s.hidden.shape[0]].tolist() for s in batch]
                rows = generate_batch(model, prompts, max_tokens=1, capture_layers=(a.layer,))
                for s, r in zip(batch, rows, strict=True):
                    new.append(Sequence(s.tokens, s.n_prompt, s.hidden.float(), s.kv | {FULL: r.kv[a.layer]}))
            save_shard(new, dst, meta={"seconds": round(time.time() - t0, 1)})
            print(dst, f"{time.time() - t0:.0f} s", flush=True)


def train_drafter(a) -> None:
    import aheadlm
    from aheadlm.drafter import DrafterConfig, MTPDrafter, save_drafter
    from aheadlm.train.cli import held_out_prompts, make_evaluator
    from aheadlm.train.clusters import use_clusters
    from aheadlm.train.distill import load_folder
    from aheadlm.train.trainer import Tables, TrainConfig, train
    from aheadlm.train.warm_start import warm_start

    llm = aheadlm.load(a.model, drafter="none")
    target, data = llm.engine.model, Path(a.data)
    val = held_out_prompts(llm.tokenizer)  # those `aheadlm train-drafter --seed 0` holds out
    seqs = load_folder(data)
    print(len(seqs), "sequences,", sum(s.hidden.shape[0] for s in seqs), "positions", flush=True)
    tcfg = target.config
    dcfg = DrafterConfig.for_target(
        tcfg, hidden_size=tcfg.hidden_size, num_layers=2, num_centroids=1024, centroid_top_k=16
    )
    drafter = MTPDrafter(dcfg).init_weights(0.02, torch.Generator().manual_seed(0))
    warm_start(drafter, target, [s.tokens.tolist() for s in seqs[:: max(1, len(seqs) // 64)]])
    tables = Tables.from_model(target, "cpu")
    use_clusters(drafter, tables, *torch.load(a.clusters))
    drafter.train()
    cfg = TrainConfig(
        steps=a.steps, lr=5e-4, seqs_per_step=4, max_anchors=256, checkpoint_every=100, eval_every=a.steps // 2
    )
    evaluate = make_evaluator(llm, val, max_tokens=64)
    state = train(drafter, tables, seqs, cfg, Path(a.out), resume=True, evaluate=evaluate, device="cpu")
    record = {"trial_kv_full_layer": a.layer, "evals": state.get("evals"), "seconds": state.get("seconds")}
    save_drafter(drafter.eval(), a.out, record, int8=True)
    print(json.dumps(record), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=("data", "train", "rounds"))
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--layer", type=int, default=17, help="target layer the drafter's full layer reads")
    ap.add_argument("--source", default="runs/distill-gemma3-270m", help="data: the shards to copy")
    ap.add_argument("--shards", type=int, default=5, help="data: how many of each kind")
    ap.add_argument("--data", help="train: the shards")
    ap.add_argument("--clusters", default="runs/gemma3-drafter-warm-l2/clusters.pt")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--out")
    ap.add_argument("--drafter", help="rounds: the trained folder")
    a, rest = ap.parse_known_args()
    point_full_layer(a.layer)
    if a.command == "data":
        recompute(a)
    elif a.command == "train":
        train_drafter(a)
    else:
        script = Path(__file__).with_name("copy_rounds.py")
        sys.argv = [str(script), "--model", a.model, "--drafter", a.drafter, *rest]
        runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
