"""Drafter training end to end on a tiny target: self-distillation shards, loss goes down,
checkpoints round-trip, a killed run resumes to the same weights, corrupt checkpoints are
reported, and the saved drafter folder loads and stays lossless."""

import json
import random
import shutil

import pytest
import torch

from aheadlm.drafter import DrafterConfig, MTPDrafter, load_drafter, save_drafter
from aheadlm.engine import Engine
from aheadlm.errors import DrafterMismatchError, InvalidRequestError, WeightsError
from aheadlm.kernels import cpu_kernels
from aheadlm.kv_cache import KVCache
from aheadlm.packed import PackedLinear, dense_state_dict
from aheadlm.proposers import MTPProposer
from aheadlm.speculative import SpecConfig
from aheadlm.train import data as data_module
from aheadlm.train.clusters import balanced_clusters
from aheadlm.train.data import corpus_sequences, load_conversations
from aheadlm.train.distill import load_folder, load_shard, write_shards
from aheadlm.train.trainer import Tables, TrainConfig, latest_checkpoint, sequence_loss, train
from aheadlm.train.warm_start import capture, warm_start

from helpers import ours_from_hf, tiny_hf


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    target = ours_from_hf(tiny_hf("gemma3", seed=7))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 160, (int(n),), generator=g).tolist() for n in torch.randint(4, 20, (12,), generator=g)]
    data = tmp_path_factory.mktemp("data")
    paths = write_shards(target, prompts, data, max_new_tokens=24, batch_size=5, per_shard=6)
    seqs = [s for p in paths for s in load_shard(p)]
    return target, seqs, data


def new_drafter(target, **kw):
    cfg = DrafterConfig.for_target(target.config, hidden_size=32, intermediate_size=64, num_layers=2, **kw)
    return MTPDrafter(cfg).init_weights(0.02, torch.Generator().manual_seed(0)).train()


CFG = dict(lr=3e-3, warmup=2, seqs_per_step=2, max_anchors=64, checkpoint_every=3, eval_every=0, negatives=32)


def test_shards(setup):
    target, seqs, data = setup
    assert len(seqs) == 12 and len(list(data.glob("shard_*.safetensors"))) == 2
    s = seqs[0]
    L = len(s.tokens) - 1
    assert s.hidden.shape == (L, target.config.hidden_size)
    assert set(s.kv) == {"full", "sliding"} and s.kv["full"][0].shape == (L, target.config.head_dim * 2)
    # rerunning finds the shards complete and generates nothing
    mtime = sorted(data.glob("shard_*"))[0].stat().st_mtime
    write_shards(target, [[1, 2, 3]] * 12, data, max_new_tokens=24, batch_size=5, per_shard=6)
    assert sorted(data.glob("shard_*"))[0].stat().st_mtime == mtime


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
def test_loss_goes_down(setup, tmp_path, bf16):
    target, seqs, _ = setup
    tables = Tables.from_model(target)
    drafter = new_drafter(target)
    cfg = TrainConfig(steps=20, bf16=bf16, **CFG)

    def fixed_loss():
        with torch.no_grad():
            return sum(float(sequence_loss(drafter, drafter, tables, s, cfg, random.Random(0), "cpu")[0]) for s in seqs)

    before = fixed_loss()
    train(drafter, tables, seqs, cfg, tmp_path)
    after = fixed_loss()
    assert after < 0.8 * before, (before, after)


def test_resume_reproduces_uninterrupted_run(setup, tmp_path):
    target, seqs, _ = setup
    tables = Tables.from_model(target)
    full = new_drafter(target)
    train(full, tables, seqs, TrainConfig(steps=9, **CFG), tmp_path / "full")
    part = new_drafter(target)
    train(part, tables, seqs, TrainConfig(steps=9, **CFG), tmp_path / "part", until=6)  # killed at step 6
    assert latest_checkpoint(tmp_path / "part").name == "step_0000006"
    resumed = new_drafter(target)  # a fresh process: weights come from the checkpoint
    state = train(resumed, tables, seqs, TrainConfig(steps=9, **CFG), tmp_path / "part", resume=True)
    assert state["step"] == 9
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)


def _ddp_rank(rank, world, port, drafter_cfg, tables, seqs, out):
    import os

    import torch.distributed as dist

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # each process starts from different weights: DistributedDataParallel must give them rank 0's
    drafter = MTPDrafter(drafter_cfg).init_weights(0.02, torch.Generator().manual_seed(rank)).train()
    train(drafter, tables, seqs, TrainConfig(steps=3, **CFG), out)
    torch.save(drafter.state_dict(), out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_data_parallel_processes_stay_in_step(setup, tmp_path):
    """Two processes as torchrun starts them: same weights after training, one checkpoint writer,
    and refusal to write data shards (they must exist before several processes start)."""
    import socket

    import torch.multiprocessing as mp

    target, seqs, data = setup
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = new_drafter(target).config
    mp.spawn(_ddp_rank, args=(2, port, cfg, Tables.from_model(target), seqs, tmp_path), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    start = MTPDrafter(cfg).init_weights(0.02, torch.Generator().manual_seed(0)).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    assert any(not torch.equal(a[k], start[k]) for k in a)  # and they did train
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000003"]
    with pytest.raises(InvalidRequestError, match="with several processes"):
        write_shards(target, [[1, 2, 3]] * 7, tmp_path / "fresh", max_new_tokens=4, per_shard=6, generate=False)
    write_shards(target, [[1, 2, 3]] * 12, data, max_new_tokens=24, per_shard=6, generate=False)  # present: fine


def test_corrupt_checkpoint_is_reported(setup, tmp_path):
    target, seqs, _ = setup
    tables = Tables.from_model(target)
    train(new_drafter(target), tables, seqs, TrainConfig(steps=3, **CFG), tmp_path)
    ck = latest_checkpoint(tmp_path)
    (ck / "optimizer.safetensors").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="corrupt"):
        train(new_drafter(target), tables, seqs, TrainConfig(steps=6, **CFG), tmp_path, resume=True)


def test_resume_with_another_shape_is_named(setup, tmp_path):
    """A checkpoint of another drafter shape is named as such (not called corrupt), also one
    written before checkpoints recorded the drafter's config; a state.json without its fields is
    corrupt; a config that would divide by zero is refused."""
    target, seqs, _ = setup
    tables = Tables.from_model(target)
    train(new_drafter(target), tables, seqs, TrainConfig(steps=3, **CFG), tmp_path)
    ck = latest_checkpoint(tmp_path)
    wide = MTPDrafter(DrafterConfig.for_target(target.config, hidden_size=40, intermediate_size=64, num_layers=2))
    with pytest.raises(InvalidRequestError, match="was trained with hidden 32, not hidden 40: resume with the same"):
        train(wide, tables, seqs, TrainConfig(steps=6, **CFG), tmp_path, resume=True)
    (ck / "drafter.json").unlink()  # as older checkpoints are
    with pytest.raises(InvalidRequestError, match=r"holds pre_projection.weight of shape \[32, 96\], not \[40, 96\]"):
        train(wide, tables, seqs, TrainConfig(steps=6, **CFG), tmp_path, resume=True)
    (ck / "state.json").write_text("{}")
    with pytest.raises(WeightsError, match="corrupt .*state.json lacks step, seq_cursor, evals, anchors"):
        train(new_drafter(target), tables, seqs, TrainConfig(steps=6, **CFG), tmp_path, resume=True)
    with pytest.raises(InvalidRequestError, match="seqs_per_step must be at least 1"):
        train(new_drafter(target), tables, seqs, TrainConfig(steps=6, **(CFG | {"seqs_per_step": 0})), tmp_path / "x")


def test_shards_record_their_source(setup, tmp_path):
    """write_shards(source=...) records what generated the shards and refuses a reuse with another
    target, other prompts or a copy head's missing layers; a moved data file is no change."""
    target, _, _ = setup
    prompts = [[5, 6, 7], [8, 9]]
    kw = dict(max_new_tokens=4, batch_size=2, per_shard=2)
    source = {"model": "tiny", "data": ["/a/prompts.jsonl"], "flags": {"seed": 0}}
    write_shards(target, prompts, tmp_path, source=source, **kw)
    record = json.loads((tmp_path / "source.json").read_text())
    assert record["hidden_size"] == 48 and record["max_new_tokens"] == 4 and record["prompts"] == 2
    write_shards(target, prompts, tmp_path, source=source | {"data": ["/b/prompts.jsonl"]}, **kw)  # moved: fine
    with pytest.raises(InvalidRequestError, match=r"generated from other prompts \(2, not 2, from \['/a/"):
        write_shards(target, [[5, 6, 7], [9, 8]], tmp_path, source=source | {"data": ["/c/x.jsonl"]}, **kw)
    with pytest.raises(InvalidRequestError, match="generated with --seed 0, not --seed 1"):
        write_shards(target, prompts, tmp_path, source=source | {"flags": {"seed": 1}}, **kw)
    with pytest.raises(InvalidRequestError, match="lacks the K/V of copy layers \\[2\\]"):
        write_shards(target, prompts, tmp_path, source=source, copy_layers=(2,), **kw)
    wider = ours_from_hf(tiny_hf("gemma3", seed=7, hidden_size=64))
    with pytest.raises(InvalidRequestError, match="was generated for tiny \\(hidden 48, vocabulary 160\\), not wide"):
        write_shards(wider, prompts, tmp_path, source=source | {"model": "wide"}, **kw)
    # shards from before the record: checked by width only, and no record is made up for them
    (tmp_path / "source.json").unlink()
    with pytest.raises(InvalidRequestError, match="holds shards of a target with hidden size 48, not wide"):
        write_shards(wider, prompts, tmp_path, source=source | {"model": "wide"}, **kw)
    write_shards(target, prompts, tmp_path, source=source, **kw)
    assert not (tmp_path / "source.json").exists()


def test_training_data_files(tmp_path, monkeypatch):
    """The lenient loader: a JSON array cut off mid-record keeps its complete records, malformed
    records are skipped and counted, one object is a one-record file, and a file with nothing
    usable is an error naming it."""
    notes = []
    monkeypatch.setattr(data_module, "status", notes.append)
    convs = [
        {"conversations": [{"from": "human", "value": f"question {i}"}, {"from": "gpt", "value": "an answer"}]}
        for i in range(3)
    ]
    text = json.dumps(convs[:2] + [{"conversations": [{"from": "human", "value": None}]}, convs[2]], indent=1)
    cut = tmp_path / "sharegpt.json"
    cut.write_text(text[: text.rindex("an answer")])  # cut off inside the last record
    items = load_conversations([str(cut)])
    assert [m[0]["content"] for m in items] == ["question 0", "question 1"]
    assert notes == [
        "sharegpt.json: 2 conversations; 1 record skipped, the first on line 26: a value is null, not text; "
        "the JSON is cut off at line 34, its incomplete last record left out"
    ]
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"messages": [{"role": "user", "content": "hello"}]}))
    assert load_conversations([str(one)]) == [[{"role": "user", "content": "hello"}]]
    lines = tmp_path / "mixed.jsonl"
    rows = ['{"prompt": "fine"}', "{broken", '{"messages": "x"}', '{"text": 5}', "[1]", '{"text": "also fine"}']
    lines.write_text("\ufeff" + "\n".join(rows))  # a byte-order mark is not part of the first record
    assert [m[0]["content"] for m in load_conversations([str(lines)])] == ["fine", "also fine"]
    assert notes[-1] == "mixed.jsonl: 2 conversations; 4 records skipped, the first on line 2: not valid JSON"
    empty = tmp_path / "assistant_only.jsonl"
    empty.write_text('{"messages": [{"role": "assistant", "content": "no question"}]}\n')
    with pytest.raises(InvalidRequestError, match=f"training data {empty} holds no conversation with a user turn$"):
        load_conversations([str(lines), str(empty)])


def test_clustered_head_and_folder_roundtrip(setup, tmp_path):
    target, seqs, _ = setup
    tables = Tables.from_model(target)
    drafter = new_drafter(target, num_centroids=16, centroid_top_k=4)
    ordering, cent = balanced_clusters(tables.head, 16)
    assert sorted(ordering.tolist()) == list(range(160))
    drafter.token_ordering = ordering
    tables.set_clusters(ordering, 16)
    assert torch.bincount(tables.cluster_of, minlength=16).tolist() == [10] * 16
    train(drafter, tables, seqs, TrainConfig(steps=4, **CFG), tmp_path)
    save_drafter(drafter.eval(), tmp_path / "drafter", {"note": "test"})
    loaded = load_drafter(tmp_path / "drafter", target.config)
    torch.testing.assert_close(loaded.token_ordering, ordering)
    # lossless with the trained drafter
    plain, spec = Engine(target), Engine(target, proposer=MTPProposer(loaded), spec=SpecConfig(3))
    for s in seqs[:4]:
        p = s.tokens[: s.n_prompt].tolist()
        a = [t for st in plain.generate(p, max_tokens=20) for t in st.token_ids]
        b = [t for st in spec.generate(p, max_tokens=20) for t in st.token_ids]
        assert a == b
    # the folder's draft threshold is the proposer's default; a bad one is refused clearly
    cfg_path = tmp_path / "drafter" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(cfg | {"draft_threshold": 0.4}))
    assert MTPProposer(load_drafter(tmp_path / "drafter", target.config)).threshold == 0.4
    for bad in (1.5, "high"):
        cfg_path.write_text(json.dumps(cfg | {"draft_threshold": bad}))
        with pytest.raises(WeightsError, match="draft_threshold"):
            load_drafter(tmp_path / "drafter", target.config)


def test_int8_drafter_folder(setup, tmp_path):
    """int8 storage: a much smaller file, every matrix within int8 rounding of the original,
    the int8 kernel on CPU, and speculative decoding with it still lossless."""
    target, seqs, _ = setup
    drafter = new_drafter(target).eval()
    save_drafter(drafter, tmp_path / "bf16")
    save_drafter(drafter, tmp_path / "int8", int8=True)
    size = {n: (tmp_path / n / "model.safetensors").stat().st_size for n in ("bf16", "int8")}
    assert size["int8"] < 0.7 * size["bf16"]
    loaded = load_drafter(tmp_path / "int8", target.config)
    ref, got = dense_state_dict(drafter), dense_state_dict(loaded)
    assert ref.keys() == got.keys()
    for k, v in ref.items():
        if v.is_floating_point():
            # half an int8 step of the block's largest weight, plus the float16 scale's rounding
            torch.testing.assert_close(got[k], v, rtol=0, atol=float(v.abs().max()) / 127)
    quantized = [m for m in loaded.modules() if isinstance(m, PackedLinear) and m.block == 32]
    assert len(quantized) >= 4 or cpu_kernels() is None
    plain, spec = Engine(target), Engine(target, proposer=MTPProposer(loaded), spec=SpecConfig(3))
    for s in seqs[:3]:
        p = s.tokens[: s.n_prompt].tolist()
        assert [t for st in plain.generate(p, max_tokens=16) for t in st.token_ids] == [
            t for st in spec.generate(p, max_tokens=16) for t in st.token_ids
        ]


def test_drafter_for_another_target_is_refused(setup, tmp_path):
    target, _, _ = setup
    save_drafter(new_drafter(target).eval(), tmp_path / "d")
    other = ours_from_hf(tiny_hf("llama", seed=1))
    with pytest.raises(DrafterMismatchError, match="does not belong"):
        load_drafter(tmp_path / "d", other.config)
    shutil.rmtree(tmp_path / "d")


def test_teacher_forced_shards(setup, tmp_path):
    """Teacher forcing stores the target's own hidden states over the given text (as a plain
    prefill computes them), every position a training target."""
    target, _, _ = setup
    g = torch.Generator().manual_seed(1)
    texts = [torch.randint(0, 160, (n,), generator=g).tolist() for n in (9, 30, 17)]
    paths = write_shards(target, texts, tmp_path / "corpus", batch_size=2, per_shard=2, teacher_forced=True)
    seqs = [s for p in paths for s in load_shard(p)]
    assert [s.tokens[:-1].tolist() for s in seqs] == texts and all(s.n_prompt == 0 for s in seqs)
    # a data folder loads its generated shards first, then its teacher-forced ones
    write_shards(target, [texts[0][:5]], tmp_path, max_new_tokens=4, per_shard=2)
    folder = load_folder(tmp_path)
    assert folder[0].n_prompt == 5 and [s.tokens.tolist() for s in folder[1:]] == [s.tokens.tolist() for s in seqs]
    for text, s in zip(texts, seqs, strict=True):
        cache = KVCache(target.config, len(text), max_step=len(text))
        with torch.inference_mode():
            logits, hidden = target(torch.tensor([text]), torch.arange(len(text))[None], cache, num_logits=1)
        torch.testing.assert_close(s.hidden.float(), hidden[0].float(), rtol=1e-2, atol=1e-2)  # stored in bf16
        assert int(s.tokens[-1]) == int(logits[0, -1].argmax())  # the target's own next token


def test_corpus_sequences_are_whole_conversations():
    class Tok:  # encodes a character per token; the chat form joins the turns
        def encode(self, text):
            return [ord(c) % 160 for c in text]

        def chat_ids(self, msgs):
            return self.encode("|".join(m["content"] for m in msgs))

    items = [[{"role": "user", "content": "q" * 50}, {"role": "assistant", "content": "a" * 80}], "t" * 300, "short"]
    seqs = corpus_sequences(Tok(), items, tokens=10_000, max_len=200, min_len=20)
    assert sorted(map(len, seqs)) == [131, 200]  # both turns kept; the text cut; "short" dropped
    assert len(corpus_sequences(Tok(), items, tokens=100, max_len=200, min_len=20)) == 1  # stops at the budget


def test_warm_start_capture_is_aligned(setup):
    # the residual entering layer 0 is the scaled embedding of the query token: X's first half
    target, seqs, _ = setup
    texts = [s.tokens.tolist() for s in seqs[:3]]
    X, Y = capture(target, texts, layer=0, max_positions=10_000)
    H = target.config.hidden_size
    assert X.shape == (sum(len(t) - 1 for t in texts), 2 * H)
    torch.testing.assert_close(Y, X[:, :H])
    # and its second half the post-norm hidden of the previous position (shards store bf16)
    torch.testing.assert_close(X[: len(seqs[0].tokens) - 2, H:], seqs[0].hidden[:-1].float(), atol=2e-2, rtol=1e-2)


def _warm_start_beats_random(target, seqs):
    tcfg = target.config
    kw = dict(hidden_size=tcfg.hidden_size, intermediate_size=tcfg.intermediate_size, num_layers=1)
    cfg = DrafterConfig.for_target(tcfg, **kw)
    random_init = MTPDrafter(cfg).init_weights(0.02, torch.Generator().manual_seed(0))
    warm = MTPDrafter(cfg).init_weights(0.02, torch.Generator().manual_seed(0))
    err = warm_start(warm, target, [s.tokens.tolist() for s in seqs])
    assert 0 <= err < 0.5
    src = target.layers[tcfg.last_layer_of("full")]
    torch.testing.assert_close(warm.layers[0].o.weight, src.attn.o.weight.float())
    torch.testing.assert_close(warm.layers[0].mlp_norm.weight, src.mlp_norm.weight.float())
    torch.testing.assert_close(warm.norm.weight, target.norm.weight.float())
    tables, tc = Tables.from_model(target), TrainConfig(**CFG)

    def loss(d):
        with torch.no_grad():
            return sum(float(sequence_loss(d, d, tables, s, tc, random.Random(0), "cpu")[0]) for s in seqs)

    assert loss(warm) < 0.7 * loss(random_init)
    return warm


def test_warm_start_begins_from_the_target(setup):
    target, seqs, _ = setup
    warm = _warm_start_beats_random(target, seqs)
    src = target.layers[target.config.last_layer_of("full")]
    torch.testing.assert_close(warm.layers[0].post_mlp_norm.weight, src.post_mlp_norm.weight.float())


def test_warm_start_from_a_llama_target(tmp_path):
    # Llama layers have no post-norms and no q-norm: the drafter takes the same pre-norm-only form
    target = ours_from_hf(tiny_hf("llama", seed=3))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 160, (int(n),), generator=g).tolist() for n in torch.randint(4, 20, (8,), generator=g)]
    seqs = [s for p in write_shards(target, prompts, tmp_path, max_new_tokens=24, batch_size=4) for s in load_shard(p)]
    warm = _warm_start_beats_random(target, seqs)
    layer = warm.layers[0]
    assert layer.post_attn_norm is None and layer.post_mlp_norm is None and layer.q_norm is None
    # a Gemma-style drafter (post-norms) cannot copy a Llama layer and is refused
    c = target.config
    sandwich = DrafterConfig.for_target(
        c, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_layers=1, sandwich_norm=True
    )
    with pytest.raises(InvalidRequestError, match="norms differ"):
        warm_start(MTPDrafter(sandwich), target, [s.tokens.tolist() for s in seqs])


def test_warm_start_refuses_other_layer_shapes(setup):
    target, _, _ = setup
    narrow = new_drafter(target)  # width 32, not the target's
    with pytest.raises(InvalidRequestError, match="cannot warm-start"):
        warm_start(narrow, target, [[1, 2, 3]])
    c = target.config
    few_heads = MTPDrafter(
        DrafterConfig.for_target(c, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_heads=2)
    )
    with pytest.raises(InvalidRequestError, match="query heads"):
        warm_start(few_heads, target, [[1, 2, 3]])


def test_target_logits_stay_float32_under_autocast(setup):
    """bf16 training (`TrainConfig.bf16`) keeps the distillation targets and the KL in float32."""
    target, _, _ = setup
    tables = Tables.from_model(target)
    h, ids = torch.randn(3, target.config.hidden_size), torch.arange(10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tables.logits(h, ids)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, tables.logits(h, ids))
