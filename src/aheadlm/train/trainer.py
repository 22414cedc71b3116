"""Drafter training on self-distillation data, with the draft chain unrolled as at inference.

For an anchor position p of a target-written sequence x (the round's last accepted token x_p, its
query position p, the target K/V of positions < p), draft depth j = 1..K takes
`(E(x_{p+j-1}) * scale, h_{j-1})` with h_0 = H[p-1] (the target's post-norm hidden) and h_j the
drafter's own post-projection output, and is trained towards the target at position p+j-1:

- feature loss: relative squared error between h_j and H[p+j-1] (h_j is scored by the target's
  output head, so matching H matches the target's whole next-token distribution);
- token loss: KL(target || drafter) over a sampled candidate set (the sequence's tokens plus
  random negatives), both sides scored through the target's output head;
- cluster loss (clustered heads): cross-entropy of the centroid scores for the cluster of the
  target's likeliest candidate.
All anchors of a sequence run in parallel: each is an independent query row with its own mask.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import SLIDING, ModelConfig
from ..drafter import MTPDrafter, RoundContext
from ..errors import InvalidRequestError, WeightsError
from ..kv_cache import AttnView
from ..model import rope_tables
from ..progress import progress, status
from .distill import Sequence


@dataclass
class TrainConfig:
    steps: int = 2000
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    depth: int = 4
    """Unrolled draft steps K."""
    depth_decay: float = 0.8
    """Loss weight of depth j is depth_decay ** (j - 1)."""
    seqs_per_step: int = 4
    max_anchors: int = 384
    feature_weight: float = 1.0
    token_weight: float = 1.0
    cluster_weight: float = 0.3
    negatives: int = 2048
    copy_weight: float = 1.0
    """Weight of a copy head's own pointer loss (see `copy_terms`)."""
    lr_scales: dict = field(default_factory=dict)
    """Learning-rate multipliers by parameter-name prefix, e.g. {"copy.": 5.0} for a part that
    starts fresh inside a warm-started drafter."""
    prompt_weight: float = 0.25
    """Weight of anchors inside the prompt (the target did not write those tokens)."""
    checkpoint_every: int = 200
    eval_every: int = 500
    bf16: bool = False
    """Run the drafter's products in bf16 (autocast; weights, optimizer state and the candidate
    logits the KL terms compare stay float32)."""
    seed: int = 0
    extra: dict = field(default_factory=dict)


class Tables:
    """The frozen target pieces training needs: input embeddings, output head, RoPE."""

    def __init__(self, target_config: ModelConfig, embed: torch.Tensor, head: torch.Tensor, device):
        self.config = target_config
        self.embed = embed.float().to(device)
        self.head = self.embed if head is embed else head.float().to(device)
        self.inv_freq = {
            t: (target_config.rope_full if t != SLIDING else target_config.rope_sliding)
            .inv_freq(target_config.type_head_dim(t))
            .to(device)
            for t in target_config.group_types
        }

    @classmethod
    def from_model(cls, model, device="cpu") -> Tables:
        emb = model.embed.weight  # dense float32 copy of a packed table
        head = emb if model.lm_head is None else model.head_rows(torch.arange(model.config.vocab_size))
        t = cls(model.config, emb, head, device)
        t.inv_freq = {k: getattr(model, f"inv_freq_{k}").to(device) for k in model.config.group_types}
        return t

    def set_clusters(self, ordering: torch.Tensor, num_clusters: int) -> None:
        """cluster_of[token] for a clustered head whose clusters are contiguous slices of `ordering`."""
        size = ordering.numel() // num_clusters
        self.cluster_of = torch.empty_like(ordering)
        self.cluster_of[ordering] = torch.arange(ordering.numel(), device=ordering.device) // size

    def logits(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # float32 also under bf16 autocast: the target's distribution is the distillation target
        with torch.autocast(h.device.type, enabled=False):
            out = h.float() @ self.head[ids].T
        cap = self.config.final_logit_softcap
        return torch.tanh(out / cap) * cap if cap else out


def sequence_loss(
    drafter: MTPDrafter, forward, tables: Tables, seq: Sequence, cfg: TrainConfig, rng: random.Random, device
):
    """Loss and metrics for one sequence (all sampled anchors, all depths). `forward` is the
    drafter itself or its DistributedDataParallel wrapper."""
    tcfg = tables.config
    x = seq.tokens.to(device)
    H = seq.hidden.to(device).float()
    L = H.shape[0]
    anchors = list(range(1, L))
    if len(anchors) > cfg.max_anchors:
        anchors = sorted(rng.sample(anchors, cfg.max_anchors))
    P = torch.tensor(anchors, device=device)
    A = len(anchors)
    weight = torch.where(P >= seq.n_prompt, 1.0, cfg.prompt_weight)

    kpos = torch.arange(L, device=device)[None]
    ctx = RoundContext({}, {})
    dcfg = drafter.config
    if drafter.copy is not None and any(key not in seq.kv for key in drafter.copy.sources):
        raise InvalidRequestError(
            f"the training data lacks the K/V of target layers {list(dcfg.copy_layers)}, which the copy head "
            "reads: write the data with the same --copy-layers"
        )
    for key, (k, v) in seq.kv.items():
        t = dcfg.key_type(key)
        shape = (1, L, tcfg.type_kv_heads(t), tcfg.type_head_dim(t))
        k = k.to(device).float().view(shape).transpose(1, 2)
        v = v.to(device).float().view(shape).transpose(1, 2)
        ctx.kv[key] = (k, v, AttnView(None, L, P[None], kpos, dcfg.window(tcfg, t), strict=True))
        ctx.rope[key] = rope_tables(tables.inv_freq[t], P[None], torch.float32)

    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    negatives = torch.randint(0, tcfg.vocab_size, (cfg.negatives,), generator=gen).to(device)
    # The sequence's own tokens are the likeliest competitors (and, on teacher-forced text where the
    # next token is the corpus's, usually contain the target's own choice).
    cand = torch.unique(torch.cat([x, negatives]))
    h = H[P - 1][None]
    total = torch.zeros((), device=device)
    metrics = {}
    ptr = None  # the copy head's pointer of the previous depth
    for j in range(1, cfg.depth + 1):
        valid = (P + j - 1 <= L - 1).float() * weight
        if valid.sum() == 0:
            break
        idx = (P + j - 1).clamp(max=L - 1)
        tok_in = x[idx]
        emb = tables.embed[tok_in][None] * tcfg.embed_scale
        h_in = h
        _, h = forward(emb, h, ctx)
        hn, y = h[0], H[idx]
        denom = valid.sum()
        feat = (((hn - y) ** 2).mean(-1) / (y**2).mean(-1).clamp_min(1e-6) * valid).sum() / denom
        ld, lt = tables.logits(hn, cand), tables.logits(y, cand)
        choice = lt.argmax(-1)  # the target's likeliest candidate
        logq = torch.log_softmax(ld, -1)
        point = None
        if drafter.copy is not None:
            # the round's last input tokens: the known ones up to the anchor, then the depths' inputs
            back = P[:, None] + j - drafter.copy.recent + torch.arange(drafter.copy.recent, device=device)
            recent = torch.where(back >= 0, x[back.clamp(0, L - 1)], -1)[None]
            ptr = drafter.copy(emb, h_in, h, ctx, x[None], recent, ptr)
            logq, *point = copy_terms(ptr, logq, x, cand, choice, P)
        pt = torch.softmax(lt, -1)
        kl = (pt * (torch.log_softmax(lt, -1) - logq)).sum(-1)
        tok = (kl * valid).sum() / denom
        loss = cfg.feature_weight * feat + cfg.token_weight * tok
        if point is not None:
            nll, pointable, hit = point
            on = valid * pointable
            loss = loss + cfg.copy_weight * (nll * on).sum() / denom
            metrics[f"point{j}"] = float((hit * on).sum() / on.sum().clamp_min(1e-6))
        if drafter.centroids is not None:
            # its cluster is what a greedy round must keep
            clu = F.cross_entropy(drafter.centroids(hn.detach()), tables.cluster_of[cand[choice]], reduction="none")
            loss = loss + cfg.cluster_weight * (clu * valid).sum() / denom
        total = total + cfg.depth_decay ** (j - 1) * loss
        with torch.no_grad():
            acc = ((logq.argmax(-1) == choice).float() * valid).sum() / denom
        metrics[f"acc{j}"] = float(acc)
        metrics[f"feat{j}"] = float(feat.detach())
    return total, metrics, A


def copy_terms(ptr, logq, tokens, cand, choice, P):
    """A copy head's part of one depth, from its `Pointer` -> (log of the mixed distribution
    (1 - g) q_head + g q_copy over the candidates, the pointer's own negative log-likelihood of the
    target's choice, whether a known token is that choice, whether the pointer's heaviest token is
    it), per anchor. The pointer proposes only the sequence's own tokens, all of them candidates.
    Its own loss lets it learn to aim while the gate is still shut (through the mixture alone, the
    gate shuts first)."""
    # float32 like logq, also when the pointer ran under bf16 autocast
    ids, w, g = ptr.ids(tokens[None])[0], ptr.w[0].float(), ptr.g[0].float()
    q = torch.zeros_like(logq).scatter_add_(1, torch.searchsorted(cand, ids.contiguous()), w)
    mixed = torch.log(((1 - g)[:, None] * logq.exp() + g[:, None] * q).clamp_min(1e-30))
    known = torch.arange(tokens.numel(), device=P.device)[None] <= P[:, None]  # the tokens up to the query
    pointable = ((tokens[None] == cand[choice][:, None]) & known).any(-1).float()
    nll = -torch.log(q.gather(1, choice[:, None])[:, 0].clamp_min(1e-9))
    return mixed, nll, pointable, (q.argmax(-1) == choice).float()


# -- checkpoints ---------------------------------------------------------------------------------
def save_checkpoint(out: Path, step: int, drafter: MTPDrafter, opt: torch.optim.Optimizer, state: dict) -> Path:
    from safetensors.torch import save_file

    ck = out / "checkpoints" / f"step_{step:07d}"
    tmp = ck.with_name(ck.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in drafter.state_dict().items()}, str(tmp / "drafter.safetensors"))
    flat, meta = {}, {"param_groups": opt.state_dict()["param_groups"]}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            flat[f"{i}.{k}"] = v.detach().reshape(-1).contiguous() if v.dim() == 0 else v.detach().contiguous()
    save_file(flat, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}))
    # the drafter's shape, so a resume with other shape flags is told so (`check_checkpoint`)
    (tmp / "drafter.json").write_text(json.dumps(drafter.config.to_dict()))
    shutil.rmtree(ck, ignore_errors=True)  # a rerun that reaches the same step again replaces it
    tmp.replace(ck)
    # keep the two newest
    for old in sorted((out / "checkpoints").glob("step_*"))[:-2]:
        if old.suffix != ".tmp":
            shutil.rmtree(old, ignore_errors=True)
    return ck


def latest_checkpoint(out: Path) -> Path | None:
    cks = [p for p in sorted((out / "checkpoints").glob("step_*")) if not p.name.endswith(".tmp")]
    return cks[-1] if cks else None


STATE_KEYS = ("step", "seq_cursor", "evals", "anchors")
"""What a checkpoint's state.json must hold for training to continue from it."""

SHAPE_FLAGS = {
    "hidden_size": "hidden",
    "intermediate_size": "intermediate",
    "num_layers": "layers",
    "num_centroids": "centroids",
    "centroid_top_k": "centroid-top-k",
    "copy_head": "copy-head",
    "copy_layers": "copy-layers",
    "copy_follow": "copy-follow",
    "copy_match": "copy-match",
}
"""Drafter config fields set by train-drafter flags (the others follow the target)."""

TARGET_FIELDS = {"target_arch": "architecture", "target_hidden": "target width", "vocab_size": "vocabulary"}
"""Drafter config fields that name its target, as a mismatch message calls them."""


def _corrupt(ck: Path, e: Exception) -> WeightsError:
    return WeightsError(
        f"checkpoint {ck} is corrupt ({type(e).__name__}: {e}); delete it to resume from the previous one"
    )


def _shape_mismatch(ck: Path, drafter: MTPDrafter) -> str | None:
    """How the checkpoint's drafter differs in shape from `drafter` (None: it does not)."""
    from safetensors import safe_open

    saved = ck / "drafter.json"
    if saved.exists():  # written since checkpoints record the drafter's config
        old = json.loads(saved.read_text())
        if not isinstance(old, dict):
            raise ValueError("drafter.json is not an object")
        # JSON has lists where the config has tuples; the threshold is chosen after training
        new = json.loads(json.dumps(drafter.config.to_dict()))
        diff = [k for k in new if k in old and k != "draft_threshold" and old[k] != new[k]]

        def show(cfg: dict, keys: list[str]) -> str:
            return " and ".join(f"{SHAPE_FLAGS.get(k, TARGET_FIELDS.get(k, k))} {cfg[k]}" for k in keys)

        # a flag's field first: the fields derived from it (layer_types from layers) would only add
        # noise. Other derived fields are left to the tensor shapes below, so that a default that
        # changed between versions does not refuse a checkpoint that still loads.
        if flags := [k for k in diff if k in SHAPE_FLAGS]:
            return f"was trained with {show(old, flags)}, not {show(new, flags)}"
        if target := [k for k in TARGET_FIELDS if k in diff]:
            return f"was trained for another target ({show(old, target)}, not {show(new, target)})"
    here = {k: list(v.shape) for k, v in drafter.state_dict().items()}
    with safe_open(str(ck / "drafter.safetensors"), "pt") as f:
        names = f.keys()  # a safetensors handle, not a dict: it cannot be iterated
        there = {k: f.get_slice(k).get_shape() for k in names}
    if missing := sorted(here.keys() - there.keys()):
        return f"has no {missing[0]} weights, which this drafter has"
    if extra := sorted(there.keys() - here.keys()):
        return f"has {extra[0]} weights, which this drafter lacks"
    for k, shape in here.items():
        if list(there[k]) != shape:
            return f"holds {k} of shape {list(there[k])}, not {shape}"
    return None


def check_checkpoint(ck: Path, drafter: MTPDrafter) -> None:
    """Refuse to resume `drafter` from a checkpoint of another drafter shape (a flag that differs
    from the first run), or one that is damaged; cheap: reads headers and JSON only."""
    from safetensors import SafetensorError

    try:
        state = json.loads((ck / "state.json").read_text())
        missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
        if missing:
            raise ValueError(f"state.json lacks {', '.join(missing)}")
        mismatch = _shape_mismatch(ck, drafter)
    except (SafetensorError, OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise _corrupt(ck, e) from None
    if mismatch:
        raise InvalidRequestError(f"checkpoint {ck} {mismatch}: resume with the same shape flags, or use another --out")


def load_checkpoint(ck: Path, drafter: MTPDrafter, opt: torch.optim.Optimizer) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_checkpoint(ck, drafter)
    try:
        drafter.load_state_dict(load_file(str(ck / "drafter.safetensors")))
        flat = load_file(str(ck / "optimizer.safetensors"))
        meta = json.loads((ck / "optimizer.json").read_text())
        state: dict[int, dict] = {}
        for key, v in flat.items():
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = v.reshape(()) if name == "step" else v
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        return json.loads((ck / "state.json").read_text())
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError, json.JSONDecodeError) as e:
        raise _corrupt(ck, e) from None


def bf16_pays(device) -> bool:
    """Whether bf16 products are native here: CUDA with bf16, or a CPU with AVX512-BF16 (1.4x
    faster drafter training on Zen 5); elsewhere bf16 on CPU is emulated and slower."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    # a private probe: a torch without it counts as no bf16
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def world_and_rank() -> tuple[int, int]:
    """(processes, this process's index) as torchrun sets them; (1, 0) for a single process."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def train(
    drafter: MTPDrafter,
    tables: Tables,
    sequences: list[Sequence],
    cfg: TrainConfig,
    out: Path,
    *,
    resume: bool = False,
    evaluate=None,
    device="cpu",
    until: int | None = None,
) -> dict:
    """Train `drafter` in place; checkpoints under `out/checkpoints`. Returns the final state.
    `until` stops this run early at that step (the schedule still spans `cfg.steps`)."""
    import torch.distributed as dist

    if not sequences:
        raise InvalidRequestError("no training sequences: the data gave no prompt")
    # the command line says which flag; this guards other callers against a division by zero later
    if bad := [k for k in ("depth", "seqs_per_step", "max_anchors", "checkpoint_every") if getattr(cfg, k) < 1]:
        raise InvalidRequestError(f"TrainConfig.{bad[0]} must be at least 1, got {getattr(cfg, bad[0])}")
    world, rank = world_and_rank()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    model = drafter
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(drafter)
    named = [(n, p) for n, p in drafter.named_parameters() if p.requires_grad]
    params = [p for _, p in named]

    def scale_of(name: str) -> float:
        return next((v for k, v in cfg.lr_scales.items() if name.startswith(k)), 1.0)

    groups: dict[float, list] = {}
    for n, p in named:
        groups.setdefault(scale_of(n), []).append(p)
    opt = torch.optim.AdamW(
        [{"params": ps, "lr_scale": sc} for sc, ps in groups.items()],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=(0.9, 0.95),
    )
    state = {"step": 0, "seq_cursor": 0, "evals": [], "anchors": 0, "seconds": 0.0}
    if resume and (ck := latest_checkpoint(out)) is not None:
        state = load_checkpoint(ck, drafter, opt)
        status(f"resumed from {ck.name}")
    first_step = state["step"]
    order = list(range(len(sequences)))
    rng = random.Random(cfg.seed)
    epoch_rng = random.Random(cfg.seed + 1)
    epoch = state["seq_cursor"] // len(order)
    for _ in range(epoch + 1):
        epoch_rng.shuffle(order)
    last = min(cfg.steps, until or cfg.steps)
    bar = progress(
        range(state["step"], last), desc="train-drafter", initial=state["step"], total=cfg.steps, show=rank == 0
    )
    t_start = time.time() - state.get("seconds", 0.0)
    device_type = torch.device(device).type
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg) * g.get("lr_scale", 1.0)
        opt.zero_grad(set_to_none=True)
        agg: dict[str, float] = {}
        anchors = 0
        for _ in range(cfg.seqs_per_step):
            c = state["seq_cursor"]
            if c // len(order) != epoch:
                epoch = c // len(order)
                epoch_rng.shuffle(order)
            seq = sequences[order[(c * world + rank) % len(order)]]
            state["seq_cursor"] = c + 1
            rng.seed(cfg.seed * 1_000_003 + c)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss, m, a = sequence_loss(drafter, model, tables, seq, cfg, rng, device)
            (loss / cfg.seqs_per_step).backward()
            anchors += a
            for k, v in m.items():
                agg[k] = agg.get(k, 0.0) + v / cfg.seqs_per_step
            agg["loss"] = agg.get("loss", 0.0) + float(loss.detach()) / cfg.seqs_per_step
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        state["step"] = step + 1
        state["anchors"] += anchors * world
        state["seconds"] = time.time() - t_start
        rate = state["anchors"] / max(state["seconds"], 1e-6)
        accs = "/".join(f"{agg.get(f'acc{j}', 0):.2f}" for j in range(1, cfg.depth + 1))
        if "point1" in agg:  # a copy head: how often its pointer aims at the target's choice
            accs += " point " + "/".join(f"{agg.get(f'point{j}', 0):.2f}" for j in range(1, cfg.depth + 1))
        bar.set_postfix_str(f"loss {agg['loss']:.3f} acc {accs} {rate:.0f} anchors/s")
        if rank == 0 and evaluate is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            drafter.eval()
            tau = evaluate(drafter)
            drafter.train()
            state["evals"].append({"step": step + 1, "tau": tau})
            status(f"step {step + 1}: validation tau {tau:.3f}")
        state["last"] = agg
        if rank == 0 and (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(out, step + 1, drafter, opt, state)
    # a resumed run that had nothing left to do keeps its checkpoint as it is
    if rank == 0 and state["step"] % cfg.checkpoint_every and state["step"] > first_step:
        save_checkpoint(out, state["step"], drafter, opt, state)
    state["config"] = asdict(cfg)
    return state
