"""Trial: does self-distilled data with long prompts teach the drafter to copy from far back?

    python benchmarks/long_prompt_trial.py data --out runs/distill-gemma3-long --prompts 320
    python benchmarks/long_prompt_trial.py finetune --out runs/ft-C1 --extra runs/distill-gemma3-long
    python benchmarks/long_prompt_trial.py finetune --out runs/ft-C0
    python benchmarks/copy_rounds.py --drafter runs/ft-C1 --limit 1 --max-tokens 128

On Spec-Bench the shipped drafter accepts fewer drafts the further back the text the target copies
(`copy_rounds.py`), and its training prompts were cut to 160 tokens. `data` writes
self-distillation shards (the target writes 160 tokens, the usual temperature mix) for ShareGPT
prompts of at least 512 tokens, cut to 1,024, from conversations 3,000 onwards of the seed-0
shuffle (no earlier run used them). `finetune` starts from a training run's checkpoint and
trains for `--steps` on that run's shards plus `--extra` ones, with a fresh short schedule; the
two arms differ only in `--extra`.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch


def write_long_shards(a) -> None:
    import aheadlm
    from aheadlm.train.data import build_prompts, load_conversations
    from aheadlm.train.distill import write_shards

    llm = aheadlm.load(a.model, drafter="none")
    items = load_conversations(None)
    random.Random(0).shuffle(items)
    prompts = build_prompts(llm.tokenizer, items[3000:9000], max_prompt_tokens=1024, seed=0)
    long = [p for p in prompts if len(p) >= 512][: a.prompts]
    print(f"{len(long)} prompts, mean length {sum(map(len, long)) / len(long):.0f}", flush=True)
    t0 = time.time()
    write_shards(
        llm.engine.model, long, a.out, max_new_tokens=160, batch_size=16, stop_ids=llm.tokenizer.stop_ids, seed=7
    )
    print(f"{time.time() - t0:.0f} s", flush=True)


def finetune(a) -> None:
    from safetensors.torch import load_file

    import aheadlm
    from aheadlm.drafter import DrafterConfig, MTPDrafter, save_drafter
    from aheadlm.train.cli import held_out_prompts, make_evaluator
    from aheadlm.train.clusters import use_clusters
    from aheadlm.train.distill import load_folder
    from aheadlm.train.trainer import Tables, TrainConfig, train

    llm = aheadlm.load(a.model, drafter="none")
    target = llm.engine.model
    val = held_out_prompts(llm.tokenizer)  # those `aheadlm train-drafter --seed 0` holds out
    seqs = load_folder(a.data)
    for extra in a.extra:
        seqs += load_folder(extra)
    print(len(seqs), "sequences,", sum(s.hidden.shape[0] for s in seqs), "positions", flush=True)
    dcfg = DrafterConfig.for_target(
        target.config, hidden_size=target.config.hidden_size, num_layers=2, num_centroids=1024, centroid_top_k=16
    )
    drafter = MTPDrafter(dcfg)
    tables = Tables.from_model(target, "cpu")
    use_clusters(drafter, tables, *torch.load(Path(a.run) / "clusters.pt"))
    drafter.load_state_dict(load_file(str(Path(a.run) / "checkpoints" / a.checkpoint / "drafter.safetensors")))
    evaluate = make_evaluator(llm, val, max_tokens=64)
    print("validation tau at the start", evaluate(drafter.eval()), flush=True)
    cfg = TrainConfig(
        steps=a.steps, lr=2e-4, warmup=30, seqs_per_step=4, max_anchors=256, checkpoint_every=100,
        eval_every=a.steps, seed=1,
    )  # fmt: skip
    state = train(drafter.train(), tables, seqs, cfg, Path(a.out), resume=True, evaluate=evaluate, device="cpu")
    record = {"extra": a.extra, "evals": state.get("evals"), "seconds": state.get("seconds")}
    save_drafter(drafter.eval(), a.out, record, int8=True)
    print(json.dumps(record), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=("data", "finetune"))
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=320, help="data: how many long prompts")
    ap.add_argument("--run", default="runs/gemma3-drafter-warm-l2", help="finetune: the run to start from")
    ap.add_argument("--checkpoint", default="step_0001200")
    ap.add_argument("--data", default="runs/distill-gemma3-270m", help="finetune: that run's shards")
    ap.add_argument("--extra", nargs="*", default=[], help="finetune: folders of more shards")
    ap.add_argument("--steps", type=int, default=300)
    a = ap.parse_args()
    write_long_shards(a) if a.command == "data" else finetune(a)


if __name__ == "__main__":
    main()
