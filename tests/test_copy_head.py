"""The MTP drafter's copy head (a pointer over the context): what it may point at, batched rows
equal single ones, the mixed draft choice, training with it, its folder, and lossless decoding
with it on both target families (the distribution test covers sampling with it)."""

import random

import pytest
import torch

from aheadlm.copy_head import CopyHead, Pointer, recent_tokens
from aheadlm.drafter import (
    DrafterConfig,
    MTPDrafter,
    RoundContext,
    copy_key,
    load_drafter,
    save_drafter,
)
from aheadlm.engine import Engine
from aheadlm.errors import DrafterMismatchError, InvalidRequestError
from aheadlm.kernels import cpu_kernels
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


def pointer_inputs(target, positions: torch.Tensor, length: int, seed=0, **kw):
    """A round context over `length` cached slots with queries at `positions`, random K and rows."""
    g = torch.Generator().manual_seed(seed)
    cfg = DrafterConfig.for_target(target.config, hidden_size=32, intermediate_size=48, copy_head=True, **kw)
    head = CopyHead(cfg)
    for p in head.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3, generator=g)
    t = head.sources[0]
    lt = cfg.key_type(t)
    n, d = cfg.type_kv_heads(lt), cfg.type_head_dim(lt)
    k = torch.randn(1, n, length, d, generator=g)
    view = AttnView(None, length, positions[None], torch.arange(length)[None], None, True)
    rope = rope_tables(getattr(target, f"inv_freq_{lt}"), positions[None], torch.float32)
    ctx = RoundContext({t: rope}, {t: (k, k, view)})
    rows = [torch.randn(1, len(positions), cfg.target_hidden, generator=g) for _ in range(3)]
    tokens = torch.randint(0, 100, (1, length + 1), generator=g)
    return head, ctx, rows, tokens


def last_inputs(tokens, positions, n):
    """`recent` of a round's first depth at each query position: the n known tokens up to it."""
    return recent_tokens([tokens[0, : p + 1].tolist() for p in positions.tolist()], n).view(1, len(positions), n)


def test_pointer_targets_and_masks(target):
    positions = torch.tensor([1, 4, 9])
    head, ctx, rows, tokens = pointer_inputs(target, positions, 10)
    with torch.no_grad():
        p = head(*rows, ctx, tokens, last_inputs(tokens, positions, 1))
    ids, w, g = p.ids(tokens), p.w, p.g
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
        p = head(*rows, ctx, tokens, last_inputs(tokens, torch.tensor([0]), 1))
    assert float(p.w.sum()) == 0.0 and float(p.g.sum()) == 0.0


@pytest.mark.parametrize("kw", [{}, {"copy_follow": True, "copy_match": 2}])
def test_rows_together_equal_rows_alone(target, kw):
    """Training runs every anchor of a sequence as one batch of query rows; each must equal the
    same row computed alone (as a draft round computes it), at the first depth and, following or
    aiming afresh, at the second."""
    positions = torch.tensor([2, 5, 7, 11])
    head, ctx, rows, tokens = pointer_inputs(target, positions, 12, **kw)
    recent = last_inputs(tokens, positions, head.recent)
    second = torch.cat([recent[..., 1:], tokens[:, positions + 1, None]], -1)  # the next input: the true token
    t = head.sources[0]

    def alone(r):
        k, v, view = ctx.kv[t]
        one = AttnView(None, view.end, positions[None, r : r + 1], view.kpos, None, True)
        cos, sin = ctx.rope[t]
        return RoundContext({t: (cos[:, :, r : r + 1], sin[:, :, r : r + 1])}, {t: (k, v, one)})

    with torch.no_grad():
        first = head(*rows, ctx, tokens, recent)
        together = head(*rows, ctx, tokens, second, first)
        for r in range(len(positions)):
            part = [x[:, r : r + 1] for x in rows]
            p1 = head(*part, alone(r), tokens, recent[:, r : r + 1])
            p2 = head(*part, alone(r), tokens, second[:, r : r + 1], p1)
            for both, one in ((first, p1), (together, p2)):
                for a, b in zip((both.src, both.w, both.g), (one.src, one.w, one.g), strict=True):
                    torch.testing.assert_close(a[:, r : r + 1], b)


def test_follow_moves_the_agreeing_slots_on(target):
    """From depth 2 a following pointer keeps the previous entries whose token is the new input,
    one position on, renormalised, and its gate sees the share they kept; a row with no such entry
    aims afresh."""
    positions = torch.tensor([9, 9])
    head, ctx, rows, tokens = pointer_inputs(target, positions, 10, copy_follow=True)
    tokens = torch.tensor([[4, 7, 5, 4, 7, 6, 4, 8, 1, 4, 0]])
    prev = Pointer(
        torch.tensor([[[0, 3, 6, 7], [0, 3, 6, 7]]]),
        torch.tensor([[[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]]]),
        torch.zeros(1, 2),
    )
    # row 0's input is 4 (at 0, 3 and 6); row 1's is 9, which no entry proposes
    recent = torch.tensor([[[4], [9]]])
    with torch.no_grad():
        p = head(*rows, ctx, tokens, recent, prev)
        fresh = head(*rows, ctx, tokens, recent)
        gate = torch.sigmoid(head.gate(torch.cat(rows, -1))[0, :, 0] + head.follow[0] * 0.9 + head.follow[1])
    assert p.src[0, 0, :4].tolist() == [1, 4, 7, 8]  # (padded to the fresh row's entries)
    torch.testing.assert_close(p.w[0, 0, :4], torch.tensor([4, 3, 2, 0]) / 9.0)
    assert float(p.w[0, 0, 4:].sum()) == 0.0
    assert p.ids(tokens)[0, 0, :3].tolist() == [7, 7, 8]
    torch.testing.assert_close(p.g[0, 0], gate[0])
    for a, b in ((p.src, fresh.src), (p.w, fresh.w), (p.g, fresh.g)):
        torch.testing.assert_close(a[0, 1], b[0, 1])
    # a slot whose next position is past the query is not followed (it would propose a draft)
    late = Pointer(torch.tensor([[[9, 3], [9, 3]]]), torch.tensor([[[0.5, 0.5], [0.5, 0.5]]]), torch.zeros(1, 2))
    with torch.no_grad():
        p = head(*rows, ctx, tokens, torch.tensor([[[4], [4]]]), late)
    assert p.src[0, 0, :2].tolist() == [10, 4] and p.w[0, 0, :2].tolist() == [0.0, 1.0]


def test_the_draft_loops_path_equals_the_batched_one(target):
    """`CopyHead.draft_step` (one sequence, following in Python) gives the entries and gate that
    `forward` with top=COPY_TOP gives, aiming, following, and aiming afresh after a miss."""
    from aheadlm.copy_head import COPY_TOP

    L = 40
    positions = torch.tensor([L - 1])
    head, ctx, rows, _ = pointer_inputs(target, positions, L, copy_follow=True, copy_match=2)
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(0.1)  # flatter scores: more entries carry weight
        head.follow.copy_(torch.tensor([3.0, -0.5]))
        head.match.copy_(torch.tensor([1.0, 1.0]))
    tokens = [3, 4, 5, 6] * (L // 4)  # every token recurs, so entries agree with drafts
    known = torch.tensor([tokens])

    def entries(src, w):
        return {int(s): float(x) for s, x in zip(src, w, strict=True) if x > 0}

    with torch.no_grad():
        prev_t = prev_l = None
        drafts = []
        for draft in (None, 3, 9, 4):  # aim; follow the draft 3; 9 agrees with no entry: aim afresh
            drafts += [draft] if draft is not None else []
            recent = (tokens[-2:] + drafts)[-2:]
            r = torch.tensor([[recent]])
            prev_t = head(*rows, ctx, known, r, prev_t, top=COPY_TOP)
            prev_l, g = head.draft_step(*rows, ctx, tokens, known, recent, prev_l)
            got, want = entries(*prev_l), entries(prev_t.src[0, 0], prev_t.w[0, 0])
            assert got.keys() == want.keys() and len(got) > 0
            for k in got:
                assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7)
            assert g == pytest.approx(float(prev_t.g[0, 0]), rel=1e-5)


@pytest.mark.skipif(cpu_kernels() is None, reason="needs the compiled CPU kernels")
@pytest.mark.parametrize("sources", [1, 2])
def test_compiled_aim_equals_the_tensor_ops(target, sources):
    """A draft round's aim of one row runs as one compiled call (`copy_aim`); it gives the entries
    the tensor ops give (with match bonuses, masks and several key sources)."""
    from aheadlm.copy_head import COPY_TOP

    types = target.config.layer_types
    layers = tuple(i for i, t in enumerate(types) if t == types[-1])[-sources:]
    L = 30
    head, ctx, rows, tokens = pointer_inputs(target, torch.tensor([L - 1]), L, copy_match=2, copy_layers=layers)
    t = head.sources[0]
    k, v, view = ctx.kv[t]
    for key in head.sources:  # every source reads the same slots (its own keys)
        g = torch.Generator().manual_seed(len(key))
        ctx.kv[key] = (torch.randn(k.shape, generator=g), v, view)
        ctx.rope[key] = ctx.rope[t]
    tokens = torch.tensor([[3, 4, 5] * 10])
    recent = torch.tensor([[[4, 5]]])
    with torch.no_grad():
        head.match.copy_(torch.tensor([0.7, 1.3]))
        u = torch.cat(rows, -1)
        compiled = head.aim(u, ctx, tokens, recent, COPY_TOP)
    with torch.enable_grad():  # the trainer's path: tensor ops
        ops = head.aim(u, ctx, tokens, recent, COPY_TOP)
    got = {int(s): float(w) for s, w in zip(compiled[0][0, 0], compiled[1][0, 0], strict=True) if w > 1e-6}
    want = {int(s): float(w) for s, w in zip(ops[0][0, 0], ops[1][0, 0].detach(), strict=True) if w > 1e-6}
    assert got.keys() == want.keys() and len(got) > 3
    for s in got:
        assert got[s] == pytest.approx(want[s], rel=1e-4, abs=1e-6)


def test_match_bonus_scores_exact_ngrams(target):
    """With `copy_match`, a position whose preceding tokens equal the round's last inputs gets the
    bonus of each order matched, and with no other signal the pointer aims there."""
    positions = torch.tensor([11])
    head, ctx, rows, tokens = pointer_inputs(target, positions, 12, copy_match=2)
    tokens = torch.tensor([[1, 2, 3, 9, 2, 3, 5, 2, 8, 4, 1, 2, 3]])
    recent = last_inputs(tokens, positions, 2)  # ... 1, 2 (positions 10, 11)
    src = torch.arange(13)[None, None]
    with torch.no_grad():
        head.match.copy_(torch.tensor([1.0, 10.0]))
        bonus = head.match_bonus(src, tokens, recent)[0, 0]
        expect = torch.zeros(13)
        expect[[2, 5, 8, 12]] = 1.0  # after a 2
        expect[[2, 12]] += 10.0  # after 1, 2
        torch.testing.assert_close(bonus, expect)
        torch.nn.init.zeros_(head.q.weight)  # content scores 0: the bonus alone aims
        p = head(*rows, ctx, tokens, recent)
    best = p.src[0, 0, p.w[0, 0].argmax()]
    assert int(best) == 2 and p.ids(tokens)[0, 0, p.w[0, 0].argmax()] == 3


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
    for kw in ({}, {"num_centroids": 16, "centroid_top_k": 4}, {"copy_follow": True, "copy_match": 3}):
        spec = Engine(target, proposer=MTPProposer(copy_drafter(target, **kw)), spec=SpecConfig(num_draft=k))
        for prompt in ([1, 5, 9, 14, 3], [3, 100, 101, 102, 100, 101, 102, 100], [9] * 20):
            ref = [t for s in plain.generate(prompt, max_tokens=24) for t in s.token_ids]
            assert [t for s in spec.generate(prompt, max_tokens=24) for t in s.token_ids] == ref


@pytest.mark.parametrize("kw", [{}, {"copy_follow": True, "copy_match": 2}])
def test_training_and_folder_with_a_copy_head(tmp_path, kw):
    """Training with a copy head lowers the loss on prompts that repeat a phrase; the saved folder
    (int8) loads with it and decodes losslessly."""
    target = ours_from_hf(tiny_hf("gemma3", seed=7))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 160, (6,), generator=g).tolist() * 3 for _ in range(8)]
    paths = write_shards(target, prompts, tmp_path / "data", max_new_tokens=16, batch_size=4, per_shard=4)
    seqs = [s for p in paths for s in load_shard(p)]
    cfg = DrafterConfig.for_target(target.config, hidden_size=32, intermediate_size=64, copy_head=True, **kw)
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
    assert loaded.copy is not None and (loaded.copy.follow is not None) == bool(kw)
    if kw:  # its own parameters round-trip (stored in bf16)
        torch.testing.assert_close(loaded.copy.match, drafter.copy.match.bfloat16().float())
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
