"""Compiled kernels against dense float32 math, and packed models against dense ones."""

import pytest
import torch

from aheadlm.checkpoint import build_model, hf_state_dict
from aheadlm.config import from_hf_config
from aheadlm.kernels import cpu_kernels
from aheadlm.kv_cache import KVCache
from aheadlm.packed import PackedLinear, QTensor

from helpers import assert_same_cache_and_output, packed_tiny, prefill_and_decode, tiny_hf

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="no AVX2 kernels on this CPU")


def random_qtensor(n, k, block, offset, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-32, 32, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, k // block, generator=g) * 0.01
    off = torch.randn(n, k // block, generator=g) * 0.01 if offset else None
    return QTensor(q, scale, off, block)


@pytest.mark.parametrize("block,offset", [(32, False), (32, True), (16, False), (16, True)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 33, 70])
def test_q8_matches_dense(block, offset, m):
    w = random_qtensor(37, 96, block, offset)
    x = torch.randn(m, 96)
    got = PackedLinear(w, integer=False)(x)
    ref = x @ w.dequantize().t()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("zero,offset", [(0, True), (8, False)])
def test_4bit_blocks_are_bit_identical_to_int8(zero, offset):
    """Blocks whose values span 16 integers (GGUF Q4_1/Q4_K: 0..15 with offsets; Q4_0: -8..7) are
    kept two to a byte, and every product, row read and dequantization equals the int8 form's."""
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (45, 96), dtype=torch.int8, generator=g) - zero
    off = torch.randn(45, 3, generator=g) * 0.01 if offset else None
    w = QTensor(q, torch.rand(45, 3, generator=g) * 0.01, off, 32)
    four, eight = PackedLinear(w, integer=False), PackedLinear(w, nibbles=False, integer=False)
    assert (four.bits, four.zero, four.q.shape) == (4, zero, (45, 48)) and eight.bits == 8
    assert torch.equal(four.qtensor().q, q) and torch.equal(four.dense_weight(), w.dequantize())
    ids = torch.tensor([[44, 0], [7, 7]])
    assert torch.equal(four.rows(ids), w.dequantize()[ids])
    for m in (1, 2, 5, 6, 7, 13, 40):
        x = torch.randn(m, 96, generator=g)
        assert torch.equal(four(x), eight(x)), m
    x = torch.randn(96, generator=g)
    assert torch.equal(four.rows_linear(x, ids[0]), eight.rows_linear(x, ids[0]))
    # values outside a 16-integer span stay int8
    assert PackedLinear(QTensor(q * 2, w.scale, off, 32), integer=False).bits == 8


@pytest.mark.parametrize("m", [1, 3, 8, 12, 40])
def test_bf16_matches_dense(m):
    w = torch.randn(29, 64).bfloat16()
    x = torch.randn(2, m, 64)
    got = PackedLinear(w, bias=torch.ones(29))(x)
    ref = x @ w.float().t() + 1
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("integer", [False, None])
@pytest.mark.parametrize("fmt", ["q8-32", "q8-16-offset", "q4-offset", "bf16"])
@pytest.mark.parametrize("k", [80, 640])
def test_rows_do_not_depend_on_the_batch(fmt, k, integer):
    """Each row of a batched product is bit-identical to that row alone (decode = verify = prefill):
    the lossless promise rests on it, whatever vector width the kernels were built with."""
    if fmt == "bf16":
        if k % 32:
            pytest.skip("bf16 rows need K a multiple of 32")
        w = torch.randn(23, k).bfloat16()
    else:
        w = random_qtensor(23, k, 16 if fmt == "q8-16-offset" else 32, "offset" in fmt)
        if fmt == "q4-offset":
            w.q = w.q.abs().clamp_max(15)
    if isinstance(w, QTensor) and k % w.block:
        pytest.skip("K must hold whole blocks")
    lin = PackedLinear(w, integer=integer)
    assert lin.bits == (4 if fmt == "q4-offset" else 8)
    x = torch.randn(70, k)
    alone = torch.cat([lin(x[i : i + 1]) for i in range(70)])
    for m in (2, 5, 6, 7, 13, 36, 37, 70):
        assert torch.equal(lin(x[:m]), alone[:m]), m


@pytest.mark.parametrize("fmt", ["q8", "q8-offset", "bf16"])
def test_rows_linear_reads_rows_in_place(fmt):
    w = torch.randn(300, 64).bfloat16() if fmt == "bf16" else random_qtensor(300, 64, 32, "offset" in fmt)
    lin = PackedLinear(w, rows=True, integer=False)
    x = torch.randn(64)
    ids = torch.tensor([299, 0, 7, 7, 150])
    dense = w.float() if fmt == "bf16" else w.dequantize()
    assert torch.equal(lin.rows_linear(x, ids), lin(x[None])[0, ids])  # the same sums as the full product
    torch.testing.assert_close(lin.rows_linear(x, ids), dense[ids] @ x, atol=1e-5, rtol=1e-5)
    assert lin.rows_linear(x, ids[:0]).shape == (0,)
    with pytest.raises(RuntimeError, match="out of range"):
        lin.rows_linear(x, torch.tensor([300]))


def test_dequantize_rows():
    w = random_qtensor(10, 64, 32, True)
    rows = torch.tensor([[3, 1], [9, 0]])
    torch.testing.assert_close(w.dequantize(rows), w.dequantize()[rows])


def test_packed_bf16_model_matches_dense():
    """An HF checkpoint in bfloat16 runs packed (bf16 weights, float32 math) like dense float32."""
    hf = tiny_hf("llama").bfloat16()
    config = from_hf_config(hf.config.to_dict())
    packed = build_model(config, hf_state_dict(hf.state_dict().items(), config), packed=True)
    dense = build_model(config, hf_state_dict(hf.state_dict().items(), config), packed=False)
    assert any(isinstance(m, PackedLinear) for m in packed.modules())
    ids = torch.randint(0, 160, (1, 12))
    outs = []
    for model in (packed, dense):
        cache = KVCache(config, 32)
        with torch.no_grad():
            outs.append(model(ids, torch.arange(12)[None], cache)[0])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("d", [64, 256, 20])
def test_rope_kernel_is_bit_identical_to_the_tensor_ops(d):
    """The fused rotary kernel rounds like `x * cos + rotate_half(x) * sin`, on a transposed view
    (as the attention layers pass q and k) and with several batch rows and positions."""
    from aheadlm.model import apply_rope, rope_tables, rotate_half

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, d, generator=g).transpose(1, 2)  # [B, T, H, D] viewed as [B, H, T, D]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    cos, sin = rope_tables(inv, torch.tensor([[3, 4, 5, 6, 7], [0, 9, 99, 999, 4000]]), torch.float32)
    want = x * cos + rotate_half(x) * sin
    assert torch.equal(cpu_kernels().rope(x, cos, sin), want)
    with torch.inference_mode():  # the model's entry point takes the kernel at inference
        assert torch.equal(apply_rope(x, cos, sin), want)


def _attention_reference(q, k, v, kpos, qpos, scale, window, strict):
    """Float64 softmax attention with the kernel's visibility rule; rows that see nothing are 0."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    kp, qp = kpos[:, None, None, :], qpos[:, None, :, None]
    ok = (kp >= 0) & ((kp < qp) if strict else (kp <= qp))
    if window:
        ok &= qp - kp < window
    s = ((q.double() @ kk.transpose(-1, -2)) * scale).masked_fill(~ok, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ vv


@pytest.mark.parametrize("d", [8, 64, 80, 256])
@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (9, 3), (2, 2)])
@pytest.mark.parametrize("window,strict", [(0, False), (7, False), (0, True)])
def test_attention_kernel_matches_float64_and_is_batch_invariant(d, heads, kv_heads, window, strict):
    """The attention kernel (tiles of query rows over shared keys) is within 1e-5 of float64, and
    each query row's output is bit-identical whatever else is computed with it: alone, in any
    batch, with more empty slots after the cache's end, on one thread or two."""
    K, g = cpu_kernels(), torch.Generator().manual_seed(0)
    B, S, T = 2, 37, 5
    q = torch.randn(B, heads, T, d, generator=g)
    k, v = torch.randn(B, kv_heads, S, d, generator=g), torch.randn(B, kv_heads, S, d, generator=g)
    kpos = torch.arange(S).repeat(B, 1)
    kpos[1, 30:], kpos[0, 5] = -1, -1  # empty slots
    qpos = torch.stack([torch.arange(S - T, S), torch.arange(30 - T, 30)])
    qpos[1, 0] = -5  # a row that sees no key
    out = K.attention(q, k, v, kpos, qpos, 0.3, window, strict)
    assert (out.double() - _attention_reference(q, k, v, kpos, qpos, 0.3, window, strict)).abs().max() < 1e-5
    assert torch.equal(out[1, :, 0], torch.zeros(heads, d))
    for b in range(B):
        for t in range(T):
            alone = K.attention(q[b : b + 1, :, t : t + 1], k[b : b + 1], v[b : b + 1], kpos[b : b + 1],
                                qpos[b : b + 1, t : t + 1], 0.3, window, strict)  # fmt: skip
            assert torch.equal(alone[0, :, 0], out[b, :, t]), (b, t)
    more = torch.randn(B, kv_heads, 11, d, generator=g)
    wider = (torch.cat([k, more], 2), torch.cat([v, more], 2), torch.cat([kpos, torch.full((B, 11), -1)], 1))
    assert torch.equal(K.attention(q, *wider[:2], wider[2], qpos, 0.3, window, strict), out)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(K.attention(q, k, v, kpos, qpos, 0.3, window, strict), out)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("fmt", ["bf16", "q8", "q4"])
def test_compiled_layers_are_bit_identical_to_the_per_op_path(arch, fmt):
    """A decoder layer in one compiled call (`fused.py`) gives the same logits, hidden states and
    cache contents, bit for bit, as the per-op path: padded batch rows, decode steps, verification
    chunks, and (Gemma 3) sliding-window rings that wrap around."""
    config, model = packed_tiny(arch, fmt)
    compiled = [b.compiled for b in model.layers]
    assert all(c is not None for c in compiled)
    assert all(m.bits == (4 if fmt == "q4" else 8) for m in model.modules() if isinstance(m, PackedLinear) and m.block)
    g = torch.Generator().manual_seed(1)

    def run(use_compiled: bool):
        for block, c in zip(model.layers, compiled, strict=True):
            block.compiled = c if use_compiled else None
        cache = KVCache(config, 64, batch_size=2, max_step=8)
        g.manual_seed(1)
        outs, lengths = [], [8, 5]
        ids = torch.randint(0, 160, (2, 8), generator=g)
        pos = torch.tensor([list(range(8)), list(range(5)) + [-1] * 3])
        with torch.inference_mode():
            outs += model(ids, pos, cache)
            for step in range(12):
                t = 1 if step % 3 else 5  # decode steps and verification chunks
                ids = torch.randint(0, 160, (2, t), generator=g)
                pos = torch.stack([torch.arange(n, n + t) for n in lengths])
                if step == 4:
                    pos[1] = -1  # a row that sits out a step
                outs += model(ids, pos, cache)
                lengths = [n + t for n in lengths] if step != 4 else [lengths[0] + t, lengths[1]]
        return outs, cache

    (want, ref), (got, cache) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(ref.k + ref.v, cache.k + cache.v, strict=True))
    assert ref.groups.keys() == cache.groups.keys()
    if arch == "gemma3":
        assert any(grp.ring for grp in cache.groups.values())  # the ring wrapped (lengths above 16)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_prefill_equals_decoding_token_by_token(arch):
    """A prompt prefilled in chunks gives the same logits, hidden state and cache, bit for bit, as
    the same tokens decoded one at a time (Gemma 3's sliding-window ring wraps), so K/V computed
    while decoding are the ones a later prompt holding those tokens would compute."""
    from aheadlm.engine import Engine

    config, model = packed_tiny(arch, "q8")
    engine = Engine(model, max_step=64)
    assert engine.prefill_step == 64 and Engine(model).prefill_step == 64
    ids = torch.randint(0, 160, (150,), generator=torch.Generator().manual_seed(3)).tolist()
    chunked, single = prefill_and_decode(engine, ids)
    assert_same_cache_and_output(chunked, single)
    if arch == "gemma3":
        assert any(grp.ring for grp in chunked[0].groups.values())


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_compiled_draft_layers_are_bit_identical_to_the_per_op_path(arch, tmp_path):
    """The MTP drafter's query-only layers, compiled when an int8 drafter folder is loaded, draft
    bit-identically to their per-op path over the target's sliding and full K/V."""
    from aheadlm.drafter import DrafterConfig, MTPDrafter, load_drafter, save_drafter

    config, target = packed_tiny(arch, "q8")
    cfg = DrafterConfig.for_target(config, num_layers=2, num_centroids=8, centroid_top_k=3)
    drafter = MTPDrafter(cfg).init_weights(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if "norm" in name or "layer_scalar" in name:
                p.uniform_(0.5, 1.5)  # not all ones, so a skipped multiplier shows
    save_drafter(drafter, tmp_path, int8=True)
    drafter = load_drafter(tmp_path, config)
    compiled = [layer.compiled for layer in drafter.layers]
    assert all(c is not None for c in compiled)
    cache = KVCache(config, 64)
    ids = torch.randint(0, 160, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        _, hidden = target(ids, torch.arange(20)[None], cache)

    def draft(use_compiled: bool):
        for layer, c in zip(drafter.layers, compiled, strict=True):
            layer.compiled = c if use_compiled else None
        with torch.inference_mode():
            ctx = drafter.round_context(target, cache, torch.tensor([19]))
            tokens, h, outs = ids[:, -1], hidden[:, -1], []
            for _ in range(3):
                head_in, h = drafter.step(target, tokens, h, ctx)
                tokens = drafter.logits(target, head_in).argmax(-1)
                outs += [head_in, h, tokens]
        return outs

    assert all(torch.equal(a, b) for a, b in zip(draft(False), draft(True), strict=True))

    # The whole step in one call (`fused.compile_drafter`): the same next hidden states, candidate
    # ids and scores as `MTPDrafter.step` then `MTPDrafter.scores`.
    from aheadlm import fused

    step = fused.compile_drafter(drafter, target)
    assert step is not None
    with torch.inference_mode():
        ctx = drafter.round_context(target, cache, torch.tensor([19]))
        layers = fused.draft_round(drafter, ctx)
        tok, h, h_c = int(ids[0, -1]), hidden[:, -1], hidden[0, -1]
        for _ in range(3):
            head_in, h = drafter.step(target, torch.tensor([tok]), h, ctx)
            want_ids, want = drafter.scores(target, head_in[0])
            strided = torch.stack([h_c, torch.zeros_like(h_c)], 1)[:, 0]  # a non-contiguous view
            h_c, got_ids, got = step.step(tok, strided, layers)
            assert torch.equal(h[0], h_c) and torch.equal(want_ids, got_ids) and torch.equal(want, got)
            tok = int(want_ids[want.argmax()])

    # The proposer takes the compiled step: the same drafts, confidences and (sampled) draft
    # distributions as with the per-op step, so rejection sampling sees the same q.
    from aheadlm.proposers import MTPProposer, SpecState
    from aheadlm.sampling import SamplingParams

    state = SpecState(ids[0].tolist() + [5], hidden[0, -1], cache, target)
    for params in (SamplingParams(), SamplingParams(temperature=0.7, top_k=8)):
        out = []
        for use_compiled in (True, False):
            for layer, c in zip(drafter.layers, compiled, strict=True):
                layer.compiled = c if use_compiled else None  # no compiled layers: no compiled step
            proposer = MTPProposer(drafter, threshold=0.0)
            draft = proposer.propose(state, 3, params, torch.Generator().manual_seed(4))
            assert (proposer.compiled_step(target) is not None) == use_compiled
            out.append(draft)
        assert out[0].tokens == out[1].tokens and out[0].confidences == out[1].confidences
        assert (out[0].probs is None) == params.greedy
        assert params.greedy or torch.equal(out[0].probs, out[1].probs)


needs_int_products = pytest.mark.skipif(
    cpu_kernels() is None or not cpu_kernels().int_products_compiled(), reason="no AVX-512 VNNI in this build"
)


@needs_int_products
@pytest.mark.parametrize(
    "block,offset,bits", [(32, False, 8), (16, False, 8), (32, True, 8), (16, True, 8), (32, True, 4), (32, False, 4)]
)
@pytest.mark.parametrize("n,k", [(37, 96), (4099, 576), (16, 640)])
def test_integer_products_are_close_to_float32_and_batch_invariant(block, offset, bits, n, k):
    """Integer products round x to 16-bit integers per block of 32: outputs stay within 2e-4 of the
    largest float32 one, typically 5e-5 (6e-4 for a row with a 200-sigma outlier), and each row of a batch
    is bit-identical to that row alone (chunks of 8 rows, slabs, any M), so verification still
    matches decoding exactly."""
    g = torch.Generator().manual_seed(1)
    if bits == 8:
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    else:  # GGUF's 4-bit blocks: 0..15 with offsets (Q4_1, Q4_K), -8..7 without (Q4_0)
        q = torch.randint(0, 16, (n, k), dtype=torch.int8, generator=g) - (0 if offset else 8)
    off = torch.randn(n, k // block, generator=g) * 0.01 if offset else None
    w = QTensor(q, torch.rand(n, k // block, generator=g) * 0.01, off, block)
    lin = PackedLinear(w)
    assert lin.bits == bits and lin.ints is not None and lin.linear is None and lin.q is None  # one regrouped copy
    x = torch.randn(70, k, generator=g)
    x[3, 5] = 200.0  # one outlier: only its block's rounding gets coarser
    x[4, :32] = 0.0
    got, ref = lin(x), (x.double() @ w.dequantize().double().t())
    err = (got.double() - ref).abs().amax(dim=1) / ref.abs().amax(dim=1)
    assert err[3] < 6e-4 and torch.cat([err[:3], err[4:]]).max() < 2e-4, err
    alone = torch.cat([lin(x[i : i + 1]) for i in range(70)])
    for m in (2, 5, 8, 9, 16, 37, 70):
        assert torch.equal(lin(x[:m]), alone[:m]), m
    assert torch.equal(lin(torch.zeros(1, k)), torch.zeros(1, n))
    x[0, 7] = float("nan")
    assert lin(x[:1]).isnan().all() and not lin(x[1:2]).isnan().any()
    # the weights come back exactly, for exports, fusing and row reads
    back = lin.qtensor()
    assert torch.equal(back.q, q) and torch.equal(back.scale, w.scale)
    assert (back.offset is None) == (off is None) and (off is None or torch.equal(back.offset, off))
    ids = torch.tensor([n - 1, 0, 3])
    assert torch.equal(lin.rows(ids), w.dequantize()[ids])
    torch.testing.assert_close(lin.rows_linear(x[1], ids), w.dequantize()[ids] @ x[1])


@needs_int_products
def test_tied_head_keeps_rows_and_uses_integer_products_unless_turned_off(monkeypatch):
    from aheadlm.packed import PackedEmbedding

    w = random_qtensor(300, 64, 32, False)
    x = torch.randn(2, 3, 64)
    emb = PackedEmbedding(w, head=True)
    assert emb.table.ints is not None and emb.table.linear is not None  # products and rows
    assert torch.equal(emb.attend(x), emb.table.ints(x.reshape(6, 64)).reshape(2, 3, 300))
    torch.testing.assert_close(emb.attend(x), x @ w.dequantize().t(), atol=1e-3, rtol=1e-3)
    ids = torch.tensor([7, 299])
    assert torch.equal(emb(ids), w.dequantize()[ids])
    assert torch.equal(emb.rows_linear(x[0, 0], ids), emb.table.linear(x[0, 0][None], ids)[0])  # in place
    assert PackedEmbedding(w).table.ints is None  # a plain table (Gemma 4's per-layer one) keeps rows only
    monkeypatch.setenv("AHEADLM_INT_PRODUCTS", "0")
    assert PackedEmbedding(w, head=True).table.ints is None and PackedLinear(w).ints is None
