"""Gemma 4 targets and Gemma 4 assistant drafters, exact against transformers' reference
implementation on small random checkpoints written by `save_pretrained`: an E2B-like model (per-layer
embeddings, KV sharing, double-wide MLP), a 31B-like one (k_eq_v) and an MoE one (26B-A4B-like)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from aheadlm.checkpoint import build_model, hf_config, hf_folder_weights, read_config
from aheadlm.drafter import DrafterConfig, MTPDrafter, load_drafter
from aheadlm.engine import Engine
from aheadlm.errors import DrafterMismatchError, UnsupportedModelError
from aheadlm.gemma4_assistant import export_assistant
from aheadlm.kv_cache import KVCache
from aheadlm.packed import PackedLinear
from aheadlm.proposers import MTPProposer, SpecState
from aheadlm.sampling import SamplingParams
from aheadlm.speculative import SpecConfig

from helpers import ours_from_hf, reference_drafts, tiny_gemma4, tiny_gemma4_assistant, tiny_hf

FAMILIES = ["e2b", "31b", "moe"]


def load_ours(folder):
    config = hf_config(folder)
    return build_model(config, hf_folder_weights(folder, config))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (transformers model reloaded from disk, our model loaded from the same folder, folder)."""
    from transformers import AutoModelForCausalLM

    out = {}
    for i, family in enumerate(FAMILIES):
        folder = tmp_path_factory.mktemp(family)
        tiny_gemma4(family, seed=10 + i).save_pretrained(folder)
        ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        out[family] = (ref, load_ours(folder), folder)
    return out


def our_logits(model, ids, splits):
    """Logits of every position, fed in chunks of the given sizes (prefill, verify, decode)."""
    cache = KVCache(model.config, 64, max_step=max(splits))  # small rings: wrap-around is exercised
    out, start = [], 0
    for n in splits:
        logits, _ = model(torch.tensor([ids[start : start + n]]), torch.arange(start, start + n)[None], cache)
        out.append(logits[0])
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(saved, family):
    ref, ours, _ = saved[family]
    ids = torch.randint(3, 256, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    for splits in ([30], [10, 5, 1, 1, 1, 4, 8]):  # past the window of 8, through rings and chunks
        got = our_logits(ours, ids, splits)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_config_shapes(saved):
    e2b = saved["e2b"][1].config
    assert (e2b.head_dim, e2b.head_dim_full, e2b.num_kv_shared_layers, e2b.per_layer_dim) == (16, 32, 3, 16)
    assert [e2b.kv_source(i) for i in range(6)] == [0, 1, 2, 1, 1, 2]
    assert e2b.layer_intermediate(5) == 2 * e2b.layer_intermediate(0)
    k_eq_v = saved["31b"][1].config
    assert k_eq_v.k_eq_v and k_eq_v.type_kv_heads("full") == 1 and k_eq_v.type_kv_heads("sliding") == 2
    for family in FAMILIES:
        ref, ours, folder = saved[family]
        params = sum(p.numel() for p in ref.model.parameters()) + len(ours.layers)  # + layer scalars
        assert read_config(folder).num_params == params


def test_bf16_checkpoint_stays_packed(tmp_path):
    """A bf16 folder loads shard by shard without widening its matrices, and computes what
    transformers computes from the same bf16 weights."""
    from transformers import AutoModelForCausalLM

    tiny_gemma4("31b", seed=3).to(torch.bfloat16).save_pretrained(tmp_path)
    ours = load_ours(tmp_path)
    assert isinstance(ours.layers[0].attn.qkv, PackedLinear)
    assert ours.layers[0].attn.qkv.w16 is not None  # bf16, not widened
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = list(range(5, 25))
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(our_logits(ours, ids, [20]), expected, atol=2e-5, rtol=1e-4)


def test_multimodal_checkpoint_loads_text_model(tmp_path, capsys, monkeypatch):
    from transformers import (
        AutoModelForImageTextToText,
        Gemma4Config,
        Gemma4ForConditionalGeneration,
        Gemma4VisionConfig,
    )

    from helpers import tiny_gemma4_text_config

    torch.manual_seed(0)
    vision = Gemma4VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2
    )
    config = Gemma4Config(text_config=tiny_gemma4_text_config("e2b"), vision_config=vision)
    model = Gemma4ForConditionalGeneration(config)
    model.save_pretrained(tmp_path)
    monkeypatch.setenv("AHEADLM_QUIET", "0")
    ours = load_ours(tmp_path)
    assert "vision" in capsys.readouterr().err
    ref = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = list(range(10, 30))
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(our_logits(ours, ids, [12, 8]), expected, atol=2e-5, rtol=1e-4)


def our_drafts(model, drafter, ids, k):
    cache = KVCache(model.config, 64)
    with torch.no_grad():
        _, hidden = model(torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1)[None], cache)
    state = SpecState(list(ids), hidden[0, -1], cache, model)
    return MTPProposer(drafter).propose(state, k, SamplingParams(temperature=0.0), torch.Generator()).tokens


@pytest.fixture(scope="module")
def assistants(saved, tmp_path_factory):
    """family -> (transformers assistant, our drafter loaded from its folder); E2B-like with the
    centroid head, the 31B- and MoE-like ones with the dense tied head (as Google ships them)."""
    from transformers import Gemma4AssistantForCausalLM

    out = {}
    for family in FAMILIES:
        ref, ours, _ = saved[family]
        folder = tmp_path_factory.mktemp(f"{family}-assistant")
        tiny_gemma4_assistant(ref.config, seed=7, ordered=family == "e2b").save_pretrained(folder)
        assistant = Gemma4AssistantForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        out[family] = (assistant, load_drafter(folder, ours.config), folder)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_assistant_drafts_match_reference(saved, assistants, family):
    ref, ours, _ = saved[family]
    assistant, drafter, _ = assistants[family]
    assert (drafter.centroids is not None) == (family == "e2b")
    g = torch.Generator().manual_seed(2)
    for length in (3, 8, 9, 10, 11, 17, 30):  # around and past the sliding window (8)
        ids = torch.randint(3, 256, (length,), generator=g).tolist()
        assert our_drafts(ours, drafter, ids, 4) == reference_drafts(ref, assistant, ids, 4), length


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_mtp_equals_plain_and_transformers(saved, assistants, family):
    ref, ours, _ = saved[family]
    assistant, drafter, _ = assistants[family]
    assistant.generation_config.num_assistant_tokens = 3
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        prompt = torch.randint(3, 256, (6,), generator=g).tolist()
        with torch.no_grad():
            kw = dict(max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
            hf_plain = ref.generate(torch.tensor([prompt]), **kw)[0, 6:].tolist()
            hf_mtp = ref.generate(torch.tensor([prompt]), assistant_model=assistant, **kw)[0, 6:].tolist()
        plain = [t for s in Engine(ours).generate(prompt, max_tokens=24) for t in s.token_ids]
        engine = Engine(ours, proposer=MTPProposer(drafter), spec=SpecConfig(3))
        mtp = [t for s in engine.generate(prompt, max_tokens=24) for t in s.token_ids]
        assert mtp == plain == hf_plain == hf_mtp


@pytest.mark.parametrize("head", ["target", "own"])
def test_export_drafter_loads_in_transformers(saved, tmp_path, head):
    """A drafter of ours for a Gemma 4 target, exported as `gemma4_assistant`, drafts in
    transformers exactly what it drafts here."""
    from transformers import Gemma4AssistantForCausalLM

    ref, ours, _ = saved["e2b"]
    cfg = DrafterConfig.for_target(
        ours.config, hidden_size=32, intermediate_size=48, num_layers=2, num_centroids=16, centroid_top_k=4, head=head
    )
    drafter = MTPDrafter(cfg).init_weights(0.3, torch.Generator().manual_seed(0)).eval()
    drafter.token_ordering = torch.randperm(256, generator=torch.Generator().manual_seed(1))
    export_assistant(drafter, ours.config, ours.head_rows(torch.arange(256)), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gemma4_assistant"
    assistant = Gemma4AssistantForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    reloaded = load_drafter(tmp_path, ours.config)
    g = torch.Generator().manual_seed(4)
    for length in (5, 12, 25):
        ids = torch.randint(3, 256, (length,), generator=g).tolist()
        mine = our_drafts(ours, drafter, ids, 4)
        assert reference_drafts(ref, assistant, ids, 4) == mine == our_drafts(ours, reloaded, ids, 4)


def test_clear_errors(saved, assistants, tmp_path):
    _, ours, folder = saved["e2b"]
    _, _, assistant_folder = assistants["e2b"]
    # an assistant for another target
    with pytest.raises(DrafterMismatchError):
        load_drafter(assistant_folder, saved["31b"][1].config)
    gemma3 = ours_from_hf(tiny_hf("gemma3"))
    with pytest.raises(DrafterMismatchError, match="Gemma 4 target"):
        load_drafter(assistant_folder, gemma3.config)
    # an assistant given as the target
    with pytest.raises(UnsupportedModelError, match="--drafter"):
        hf_config(assistant_folder)
    # unsupported variants
    cfg = json.loads((folder / "config.json").read_text())
    for change in ({"use_bidirectional_attention": "all"}, {"hidden_activation": "silu"}, {"attention_bias": True}):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(UnsupportedModelError):
            hf_config(tmp_path)
    # exporting for a non-Gemma-4 target
    d = MTPDrafter(DrafterConfig.for_target(gemma3.config, hidden_size=32, intermediate_size=48))
    with pytest.raises(UnsupportedModelError):
        export_assistant(d, gemma3.config, gemma3.head_rows(torch.arange(160)), tmp_path / "x")
    # a drafter with a copy head, which Gemma 4 assistants do not have
    d = MTPDrafter(DrafterConfig.for_target(ours.config, hidden_size=32, intermediate_size=48, copy_head=True))
    with pytest.raises(UnsupportedModelError, match="copy head"):
        export_assistant(d, ours.config, ours.head_rows(torch.arange(256)), tmp_path / "y")


def test_models_command_describes_folders(saved):
    _, ours, folder = saved["moe"]
    out = subprocess.run(
        [sys.executable, "-m", "aheadlm.cli", "models", "--json", str(folder)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)
    assert row["arch"] == "gemma4" and row["params"] == ours.config.num_params
    assert row["weights_gib_bf16"] >= 0 and row["kv_cache_mib_4096"] > 0


def test_train_drafter_for_gemma4_then_export(saved, tmp_path):
    """train-drafter's pipeline on a Gemma 4 target (per-type head dims, KV sharing, the assistant's
    sliding window): the loss goes down, the drafter stays lossless, and its export drafts the same
    tokens in transformers."""
    import random

    from transformers import Gemma4AssistantForCausalLM

    from aheadlm.cli import main as cli_main
    from aheadlm.drafter import save_drafter
    from aheadlm.train.distill import load_shard, write_shards
    from aheadlm.train.trainer import Tables, TrainConfig, sequence_loss, train

    ref, ours, folder = saved["e2b"]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (int(n),), generator=g).tolist() for n in torch.randint(4, 16, (6,), generator=g)]
    paths = write_shards(ours, prompts, tmp_path / "data", max_new_tokens=20, batch_size=3, per_shard=6)
    seqs = [s for p in paths for s in load_shard(p)]
    assert seqs[0].kv["full"][0].shape[1] == 1 * 32 and seqs[0].kv["sliding"][0].shape[1] == 1 * 16
    cfg = DrafterConfig.for_target(ours.config, hidden_size=32, intermediate_size=64, num_layers=2)
    drafter = MTPDrafter(cfg).init_weights(0.02, torch.Generator().manual_seed(0)).train()
    tables = Tables.from_model(ours)
    tc = TrainConfig(steps=40, lr=3e-3, warmup=2, seqs_per_step=2, max_anchors=64, eval_every=0, negatives=32)

    def loss():
        with torch.no_grad():
            return sum(float(sequence_loss(drafter, drafter, tables, s, tc, random.Random(0), "cpu")[0]) for s in seqs)

    before = loss()
    train(drafter, tables, seqs, tc, tmp_path / "run")
    assert loss() < 0.8 * before
    drafter.eval()
    prompt = prompts[0]
    plain = [t for s in Engine(ours).generate(prompt, max_tokens=20) for t in s.token_ids]
    engine = Engine(ours, proposer=MTPProposer(drafter), spec=SpecConfig(3))
    assert [t for s in engine.generate(prompt, max_tokens=20) for t in s.token_ids] == plain
    # the command line path: a saved drafter folder -> export-drafter -> transformers
    save_drafter(drafter, tmp_path / "drafter")
    argv = ["export-drafter", "--model", str(folder), "--drafter", str(tmp_path / "drafter")]
    assert cli_main([*argv, "--out", str(tmp_path / "assistant")]) == 0
    assistant = Gemma4AssistantForCausalLM.from_pretrained(tmp_path / "assistant", dtype=torch.float32).eval()
    saved_drafter = load_drafter(tmp_path / "drafter", ours.config)
    for length in (6, 14, 24):
        ids = torch.randint(3, 256, (length,), generator=g).tolist()
        assert reference_drafts(ref, assistant, ids, 3) == our_drafts(ours, saved_drafter, ids, 3)


def test_assistant_beside_the_model_is_the_default_drafter(saved, assistants, tmp_path):
    from aheadlm.proposers import make_proposer

    _, ours, folder = saved["e2b"]
    assert make_proposer(None, ours, model_name=str(folder)) is None  # no assistant beside it
    model_dir = tmp_path / "gemma-4-tiny-it"
    shutil.copytree(folder, model_dir)
    shutil.copytree(assistants["e2b"][2], tmp_path / "gemma-4-tiny-it-assistant")
    prop = make_proposer(None, ours, model_name=str(model_dir))
    assert isinstance(prop, MTPProposer) and prop.drafter.centroids is not None
    assert make_proposer("none", ours, model_name=str(model_dir)) is None


def write_word_tokenizer(folder, vocab_size=256):
    """A word-level tokenizer ("w3" .. "w255") so a tiny checkpoint runs through the text API."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": True})
    )


def test_model_folder_with_assistant_beside_it_end_to_end(saved, assistants, tmp_path):
    """The user's layout: gemma-4-X-it beside gemma-4-X-it-assistant. The Python API and the CLI
    pick the assistant up and produce exactly the plain-decoding text."""
    import aheadlm
    from aheadlm.cli import main as cli_main

    _, _, folder = saved["e2b"]
    model_dir = tmp_path / "gemma-4-tiny-it"
    shutil.copytree(folder, model_dir)
    shutil.copytree(assistants["e2b"][2], tmp_path / "gemma-4-tiny-it-assistant")
    write_word_tokenizer(model_dir)
    prompt = "w17 w45 w99 w3 w200 w17 w45"
    mtp = aheadlm.load(str(model_dir), draft_tokens=3)
    assert isinstance(mtp.engine.proposer, MTPProposer)
    plain = aheadlm.load(str(model_dir), drafter="none")
    a, b = mtp.generate(prompt, max_tokens=20), plain.generate(prompt, max_tokens=20)
    assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason
    assert a.stats.drafted_by_position[0] > 0  # the assistant did draft
    assert a.stats.target_forwards <= b.stats.target_forwards
    assert cli_main(["generate", prompt, "--model", str(model_dir), "--max-tokens", "8", "--json"]) == 0


def test_server_with_gemma4_and_its_assistant(saved, assistants, tmp_path):
    """`aheadlm serve` on a Gemma 4 folder drafts with the assistant in its batching engine and
    returns what plain decoding returns."""
    import argparse

    from fastapi.testclient import TestClient

    import aheadlm
    from aheadlm.server import cli as server_cli
    from aheadlm.server.app import create_app

    model_dir = tmp_path / "gemma-4-tiny-it"
    shutil.copytree(saved["e2b"][2], model_dir)
    shutil.copytree(assistants["e2b"][2], tmp_path / "gemma-4-tiny-it-assistant")
    write_word_tokenizer(model_dir)
    p = argparse.ArgumentParser()
    server_cli.add_arguments(p)
    state = server_cli.build_state(p.parse_args(["-m", str(model_dir), "--slots", "2", "--n-ctx", "256"]))
    assert state.scheduler.engine.drafter is not None
    prompts = ["w17 w45 w99 w3 w200", "w5 w6 w7 w8 w9 w10 w11"]
    plain = aheadlm.load(str(model_dir), drafter="none")
    with TestClient(create_app(state)) as client:
        for prompt in prompts:
            body = {"model": state.name, "prompt": prompt, "max_tokens": 12, "temperature": 0}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == plain.generate(prompt, max_tokens=12).text
