"""The MTP drafter's copy head (a pointer over the context): what it may point at, batched rows
equal single ones, the mixed draft choice, training with it, its folder, and lossless decoding
with it on both target families (the distribution test covers sampling with it)."""

import random

import pytest
import torch

from aheadlm.drafter import (
    CopyHead,
    DrafterConfig,
    MTPDrafter,
    RoundContext,
    copy_key,
    load_drafter,
    save_drafter,
)
from aheadlm.engine import Engine
from aheadlm.errors import DrafterMismatchError, InvalidRequestError
from aheadlm.kv_cache import AttnView
from aheadlm.model import rope_tables
from aheadlm.proposers import MTPProposer, choose_mixed
from aheadlm.sampling import SamplingParams
from aheadlm.speculative import SpecConfig
from aheadlm.train.distill import load_shard, write_shards
from aheadlm.train.trainer import Tables, TrainConfig, sequence_loss, train

from helpers import ours_from_hf, tiny_hf


@pytest.fixture(scope="module", params=["gemma3", "llama"])
def target(request):
    return ours_from_hf(tiny_hf(request.param, seed=5))


def copy_drafter(target, seed=0, **kw):
    cfg = DrafterConfig.for_target(target.config, hidden_size=32, intermediate_size=48, copy_head=True, **kw)
    d = MTPDrafter(cfg).init_weights(0.2, torch.Generator().manual_seed(seed)).eval()
    torch.nn.init.zeros_(d.copy.gate.bias)  # an even mix, so the pointer decides many drafts
    return d


def pointer_inputs(target, positions: torch.Tensor, length: int, seed=0):
    """A round context over `length` cached slots with queries at `positions`, random K and rows."""
    g = torch.Generator().manual_seed(seed)
    cfg = DrafterConfig.for_target(target.config, hidden_size=32, intermediate_size=48, copy_head=True)
    head = CopyHead(cfg)
    for p in head.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3, generator=g)
    t = head.sources[0]
    n, d = cfg.type_kv_heads(t), cfg.type_head_dim(t)
    k = torch.randn(1, n, length, d, generator=g)
    view = AttnView(None, length, positions[None], torch.arange(length)[None], None, True)
    rope = rope_tables(getattr(target, f"inv_freq_{t}"), positions[None], torch.float32)
    ctx = RoundContext({t: rope}, {t: (k, k, view)})
    rows = [torch.randn(1, len(positions), cfg.target_hidden, generator=g) for _ in range(3)]
    tokens = torch.randint(0, 100, (1, length + 1), generator=g)
    return head, ctx, rows, tokens


def test_pointer_targets_and_masks(target):
    positions = torch.tensor([1, 4, 9])
    head, ctx, rows, tokens = pointer_inputs(target, positions, 10)
    with torch.no_grad():
        ids, w, g = head(*rows, ctx, tokens)
    S = 10
    assert ids.shape == w.shape == (1, 3, 2 * S) and g.shape == (1, 3)
    for r, p in enumerate(positions.tolist()):
        # head 0 proposes the token at a slot, head 1 the one after it
        assert ids[0, r, :S].tolist() == tokens[0, :S].tolist()
        assert ids[0, r, S:].tolist() == tokens[0, 1 : S + 1].tolist()
        # only slots before the query, and only tokens at or before it (known, not drafted)
        allowed = [s < p for s in range(S)] + [s + 1 <= p and s < p for s in range(S)]
        assert all(bool(w[0, r, i] > 0) == a for i, a in enumerate(allowed))
        torch.testing.assert_close(w[0, r].sum(), torch.tensor(1.0))
    # a query with nothing before it points nowhere and gets no weight
    head, ctx, rows, tokens = pointer_inputs(target, torch.tensor([0]), 4)
    with torch.no_grad():
        _, w, g = head(*rows, ctx, tokens)
    assert float(w.sum()) == 0.0 and float(g.sum()) == 0.0


def test_rows_together_equal_rows_alone(target):
    """Training runs every anchor of a sequence as one batch of query rows; each must equal the
    same row computed alone (as a draft round computes it)."""
    positions = torch.tensor([2, 5, 7, 11])
    head, ctx, rows, tokens = pointer_inputs(target, positions, 12)
    with torch.no_grad():
        together = head(*rows, ctx, tokens)
        t = head.sources[0]
        for r in range(len(positions)):
            k, v, view = ctx.kv[t]
            one = AttnView(None, view.end, positions[None, r : r + 1], view.kpos, None, True)
            cos, sin = ctx.rope[t]
            c1 = RoundContext({t: (cos[:, :, r : r + 1], sin[:, :, r : r + 1])}, {t: (k, v, one)})
            alone = head(*(x[:, r : r + 1] for x in rows), c1, tokens)
            for a, b in zip(together, alone, strict=True):
                torch.testing.assert_close(a[:, r : r + 1], b)


def test_choose_mixed():
    params = SamplingParams()
    ids, scores = torch.tensor([3, 7, 9]), torch.tensor([2.0, 1.0, 0.0])
    cids, cw = torch.tensor([5, 5, 7, 1]), torch.tensor([0.3, 0.3, 0.4, 0.0])
    # gate 0: the head's choice; gate 1: the heaviest pointed token (weights of a token add up)
    assert choose_mixed(ids, scores, (cids, cw, 0.0), 12, params, None)[0] == 3
    tok, q, conf = choose_mixed(ids, scores, (cids, cw, 1.0), 12, params, None)
    assert (tok, q) == (5, None) and conf == pytest.approx(0.6)
    # sampled: q is the mixture, placed over the vocabulary
    sampled = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    tok, q, _ = choose_mixed(ids, scores, (cids, cw, 0.5), 12, sampled, gen)
    head = torch.softmax(scores, -1)
    expect = torch.zeros(12)
    expect[ids] += 0.5 * head
    expect.index_add_(0, cids, 0.5 * cw)
    torch.testing.assert_close(q, expect)
    assert q[tok] > 0
    # a pointer with no weight leaves the head's distribution whole
    _, q, _ = choose_mixed(ids, scores, (cids, torch.zeros(4), 0.7), 12, sampled, gen)
    torch.testing.assert_close(q[ids], head)


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_identity_with_a_copy_head(target, k):
    plain = Engine(target)
    for kw in ({}, {"num_centroids": 16, "centroid_top_k": 4}):
        spec = Engine(target, proposer=MTPProposer(copy_drafter(target, **kw)), spec=SpecConfig(num_draft=k))
        for prompt in ([1, 5, 9, 14, 3], [3, 100, 101, 102, 100, 101, 102, 100], [9] * 20):
            ref = [t for s in plain.generate(prompt, max_tokens=24) for t in s.token_ids]
            assert [t for s in spec.generate(prompt, max_tokens=24) for t in s.token_ids] == ref


def test_training_and_folder_with_a_copy_head(tmp_path):
    """Training with a copy head lowers the loss on prompts that repeat a phrase; the saved folder
    (int8) loads with it and decodes losslessly."""
    target = ours_from_hf(tiny_hf("gemma3", seed=7))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 160, (6,), generator=g).tolist() * 3 for _ in range(8)]
    paths = write_shards(target, prompts, tmp_path / "data", max_new_tokens=16, batch_size=4, per_shard=4)
    seqs = [s for p in paths for s in load_shard(p)]
    cfg = DrafterConfig.for_target(target.config, hidden_size=32, intermediate_size=64, copy_head=True)
    drafter = MTPDrafter(cfg).init_weights(0.02, torch.Generator().manual_seed(0)).train()
    tables = Tables.from_model(target)
    tc = TrainConfig(
        steps=20, lr=3e-3, warmup=2, seqs_per_step=2, max_anchors=64, checkpoint_every=10, eval_every=0,
        negatives=32, prompt_weight=1.0, lr_scales={"copy.": 3.0},
    )  # fmt: skip

    def fixed_loss():
        with torch.no_grad():
            return sum(float(sequence_loss(drafter, drafter, tables, s, tc, random.Random(0), "cpu")[0]) for s in seqs)

    before = fixed_loss()
    train(drafter, tables, seqs, tc, tmp_path / "run")
    assert fixed_loss() < 0.8 * before
    save_drafter(drafter.eval(), tmp_path / "drafter", int8=True)
    loaded = load_drafter(tmp_path / "drafter", target.config)
    assert loaded.copy is not None
    plain, spec = Engine(target), Engine(target, proposer=MTPProposer(loaded), spec=SpecConfig(3))
    for p in prompts[:3]:
        ref = [t for st in plain.generate(p, max_tokens=16) for t in st.token_ids]
        assert [t for st in spec.generate(p, max_tokens=16) for t in st.token_ids] == ref


def test_copy_head_reading_other_layers(tmp_path):
    """A copy head may read other target layers' keys (scores summed): the shards keep those
    layers' K/V, the trainer refuses data without them, and decoding with it stays lossless."""
    target = ours_from_hf(tiny_hf("gemma3", seed=7))
    types = target.config.layer_types
    layers = tuple(i for i, t in enumerate(types) if t == types[0])  # every layer of one type
    assert len(layers) >= 2 and copy_key(layers[0], types) == f"copy{layers[0]}"
    assert copy_key(layers[-1], types) == types[0]  # the last of its type: stored anyway
    prompts = [[3, 9, 4, 3, 9, 4, 3, 9], [5, 6, 7, 8, 5, 6, 7]]
    plain_data = load_shard(write_shards(target, prompts, tmp_path / "a", max_new_tokens=8, per_shard=2)[0])
    shards = write_shards(target, prompts, tmp_path / "b", max_new_tokens=8, per_shard=2, copy_layers=layers)
    data = load_shard(shards[0])
    assert f"copy{layers[0]}" in data[0].kv and f"copy{layers[0]}" not in plain_data[0].kv
    cfg = DrafterConfig.for_target(
        target.config, hidden_size=32, intermediate_size=64, copy_head=True, copy_layers=layers
    )
    drafter = MTPDrafter(cfg).init_weights(0.2, torch.Generator().manual_seed(0))
    assert drafter.copy.sources == tuple(copy_key(i, types) for i in layers)
    tables, tc = Tables.from_model(target), TrainConfig(max_anchors=16, negatives=16)
    loss, metrics, _ = sequence_loss(drafter, drafter, tables, data[0], tc, random.Random(0), "cpu")
    assert torch.isfinite(loss) and "point1" in metrics
    with pytest.raises(InvalidRequestError, match="copy-layers"):
        sequence_loss(drafter, drafter, tables, plain_data[0], tc, random.Random(0), "cpu")
    torch.nn.init.zeros_(drafter.copy.gate.bias)
    save_drafter(drafter.eval(), tmp_path / "drafter")
    loaded = load_drafter(tmp_path / "drafter", target.config)
    assert loaded.config.copy_layers == layers
    plain, spec = Engine(target), Engine(target, proposer=MTPProposer(loaded), spec=SpecConfig(3))
    for p in prompts:
        ref = [t for st in plain.generate(p, max_tokens=16) for t in st.token_ids]
        assert [t for st in spec.generate(p, max_tokens=16) for t in st.token_ids] == ref
    # layers the target does not have, or of two attention types, are refused
    for bad in ((len(types),), (layers[0], next(i for i, t in enumerate(types) if t != types[0]))):
        bad_cfg = DrafterConfig.for_target(
            target.config, hidden_size=32, intermediate_size=64, copy_head=True, copy_layers=bad
        )
        with pytest.raises(DrafterMismatchError, match="copy head"):
            bad_cfg.check_target(target.config)
