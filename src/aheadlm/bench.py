"""`aheadlm bench`: every method on the same prompts in one process, per category.

    aheadlm bench --model gemma3-270m --prompts ../shared/prompts/spec_bench_dev.jsonl \\
        --methods none,mtp,ngram --max-tokens 256 --json out.json --plot out.png

Prompts are Spec-Bench style jsonl (`question_id`, `category`, `turns`; the first turn is used) or
a plain text file with one prompt per line. Methods run interleaved prompt by prompt so machine
noise hits them alike; speedups are tokens/s ratios against `none` measured in the same run.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .api import LLM, load
from .engine import Engine, GenerationStats
from .errors import InvalidRequestError
from .kernels import kernel_build
from .proposers import make_proposer
from .sampling import GREEDY_BELOW
from .speculative import SpecConfig


@dataclass
class Prompt:
    id: str
    category: str
    text: str


def read_prompts(path: str, category: str | None = None, limit: int | None = None, skip: int = 0) -> list[Prompt]:
    """Prompts of a Spec-Bench jsonl or a text file (one per line); `skip` drops the first N of each
    category and `limit` keeps the next N, so a later run can use prompts no earlier decision saw."""
    if skip < 0:
        raise InvalidRequestError(f"--skip must not be negative, got {skip}")
    if limit is not None and limit < 1:  # 0 would otherwise read as "no limit" and run every prompt
        raise InvalidRequestError(f"--limit must be at least 1, got {limit}")
    p = Path(path)
    if not p.is_file():
        raise InvalidRequestError(f"prompt file {path} not found" if not p.exists() else f"{path} is not a file")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"{path}: not UTF-8 text ({e})") from None
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                d = json.loads(line)
                text = d["turns"][0] if "turns" in d else d["prompt"]
                cat = d.get("category", "all")
                if not isinstance(d.get("turns", [text]), list) or not isinstance(text, str):
                    raise TypeError("turns must be a list of strings, prompt a string")
                if not isinstance(cat, str):
                    raise TypeError("category must be a string")
            except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as e:
                raise InvalidRequestError(f"{path}:{i + 1}: not a Spec-Bench record ({e})") from None
            out.append(Prompt(str(d.get("question_id", i)), cat, text))
        else:
            out.append(Prompt(str(i), "all", line))
    if category:
        out = [x for x in out if x.category == category]
    if limit or skip:
        # Keep categories balanced: per category, prompts skip .. skip + limit - 1.
        seen: dict[str, int] = defaultdict(int)
        kept = []
        for x in out:
            if skip <= seen[x.category] and (not limit or seen[x.category] < skip + limit):
                kept.append(x)
            seen[x.category] += 1
        out = kept
    if not out:
        raise InvalidRequestError(f"no prompts selected from {path}")
    return out


@dataclass
class Tally:
    tokens: int = 0
    decode_s: float = 0.0
    forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_s: float = 0.0
    target_s: float = 0.0
    by_pos_drafted: list[int] = field(default_factory=list)
    by_pos_accepted: list[int] = field(default_factory=list)
    by_source: dict[str, list[int]] = field(default_factory=dict)
    outputs: list[list[int]] = field(default_factory=list)

    def add(self, stats: GenerationStats, ids: list[int]) -> None:
        # Decode-phase figures: the first token (from prefill) is excluded from rates.
        self.tokens += max(0, stats.completion_tokens - 1)
        self.decode_s += stats.decode_s
        self.forwards += stats.target_forwards
        self.drafted += stats.drafted
        self.accepted += stats.accepted
        self.draft_s += stats.draft_s
        self.target_s += stats.target_s
        for i, (d, a) in enumerate(zip(stats.drafted_by_position, stats.accepted_by_position, strict=True)):
            while len(self.by_pos_drafted) <= i:
                self.by_pos_drafted.append(0)
                self.by_pos_accepted.append(0)
            self.by_pos_drafted[i] += d
            self.by_pos_accepted[i] += a
        for src, counts in stats.by_source.items():
            mine = self.by_source.setdefault(src, [0, 0, 0])
            for j, c in enumerate(counts):
                mine[j] += c
        self.outputs.append(ids)

    def summary(self, base: Tally | None, greedy: bool) -> dict:
        tps = self.tokens / self.decode_s if self.decode_s else 0.0
        out = {
            "tokens_per_s": round(tps, 2),
            "mean_accepted_length": round(self.tokens / self.forwards, 3) if self.forwards else 1.0,
            "acceptance_rate": round(self.accepted / self.drafted, 4) if self.drafted else 0.0,
            "acceptance_by_position": [
                round(a / d, 4) if d else 0.0 for a, d in zip(self.by_pos_accepted, self.by_pos_drafted, strict=True)
            ],
            "target_forwards": self.forwards,
            "completion_tokens": self.tokens,
            "decode_s": round(self.decode_s, 3),
            "draft_s": round(self.draft_s, 3),
            "target_s": round(self.target_s, 3),
        }
        if self.by_source and list(self.by_source) != [""]:
            # Which proposer drafted each round ("" = none did), its share of rounds and the
            # tokens it yielded per round (accepted + bonus).
            rounds = sum(c[0] for c in self.by_source.values())
            out["by_source"] = {
                src or "none": {"rounds": c[0], "share": round(c[0] / rounds, 4), "tau": round(1 + c[2] / c[0], 3)}
                for src, c in sorted(self.by_source.items())
            }
        if base is not None:
            base_tps = base.tokens / base.decode_s if base.decode_s else 0.0
            out["speedup"] = round(tps / base_tps, 3) if base_tps else None
            if greedy:
                out["identical_to_plain"] = self.outputs == base.outputs
        return out


def parse_methods(
    methods: str, draft_tokens: str, adaptive: bool, thresholds: str | None = None
) -> list[tuple[str, str, int, bool, float | None]]:
    """-> [(label, drafter spec, k, adaptive, threshold)]; 'none' always runs first as the
    baseline. Lists of k and thresholds are swept (threshold None: each MTP drafter's own
    `draft_threshold`); lookup alone has no confidence, so it runs once."""
    try:
        ks = [int(k) for k in str(draft_tokens).split(",") if k]
        ths = [None] if thresholds is None else [float(t) for t in str(thresholds).split(",") if t]
    except ValueError as e:
        raise InvalidRequestError(f"--draft-tokens and --threshold take numbers or comma lists: {e}") from None
    if not ks or any(not 1 <= k <= 32 for k in ks):
        raise InvalidRequestError(f"--draft-tokens must be in 1..32, got {draft_tokens!r}")
    if not ths or any(t is not None and not 0.0 <= t <= 1.0 for t in ths):
        raise InvalidRequestError(f"--threshold must be in 0..1, got {thresholds!r}")
    out = [("none", "none", 1, False, None)]
    for m in [m.strip() for m in methods.split(",") if m.strip()]:
        if m == "none":
            continue
        sweep = ths[:1] if m == "ngram" else ths
        for th in sweep:
            tag = f"/t{th:g}" if len(sweep) > 1 else ""
            for k in ks:
                label = (m if len(ks) == 1 else f"{m}/k{k}") + tag
                out.append((label, m, k, False, th))
            if adaptive:
                out.append((f"{m}/adaptive{tag}", m, max(ks), True, th))
    return out


def run_bench(args) -> dict:
    # Everything checkable is checked before the slow load.
    if args.fallback_k is not None and not 1 <= args.fallback_k <= 32:
        raise InvalidRequestError(f"--fallback-k must be in 1..32, got {args.fallback_k}")
    if args.max_tokens < 1:
        raise InvalidRequestError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    prompts = read_prompts(args.prompts, args.category, args.limit, args.skip)
    llm = load(args.model, drafter="none", dtype=args.dtype, device=args.device)
    target = llm.engine.model
    runners: dict[str, LLM] = {}
    for label, spec, k, adaptive, th in parse_methods(args.methods, args.draft_tokens, args.adaptive, args.threshold):
        prop = make_proposer(spec, target, model_name=args.model, threshold=th, fallback_k=args.fallback_k)
        if spec not in ("none",) and prop is None:
            raise InvalidRequestError(f"method {spec!r} has no drafter for {args.model}")
        engine = Engine(target, proposer=prop, spec=SpecConfig(k, adaptive))
        runners[label] = LLM(engine, llm.tokenizer, llm.name, prompt_cache=False)  # every prompt prefilled in full
    greedy = args.temperature < GREEDY_BELOW
    tallies: dict[str, dict[str, Tally]] = {m: defaultdict(Tally) for m in runners}
    # Warm up every method once (allocations, caches) before timing.
    for r in runners.values():
        r.chat([{"role": "user", "content": "Hello"}], max_tokens=8, temperature=args.temperature, seed=0)
    t0 = time.time()
    for i, p in enumerate(prompts):
        for label, r in runners.items():
            stats = GenerationStats()
            out = r.chat(
                [{"role": "user", "content": p.text}],
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                seed=args.seed + i,
                stats=stats,
            )
            tallies[label][p.category].add(stats, out.token_ids)
            tallies[label]["all"].add(stats, out.token_ids)
        if not args.quiet:
            done = time.time() - t0
            print(f"\r[{i + 1}/{len(prompts)}] {done:.0f}s", end="", file=sys.stderr, flush=True)
    if not args.quiet:
        print(file=sys.stderr)
    categories = sorted({p.category for p in prompts}) + ["all"]
    result = {
        "model": args.model,
        "prompts": args.prompts,
        "num_prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "dtype": args.dtype or "float32",
        "kernels": kernel_build(),
        "threads": torch.get_num_threads(),
        "methods": {},
    }
    for label in runners:
        result["methods"][label] = {
            c: tallies[label][c].summary(None if label == "none" else tallies["none"][c], greedy) for c in categories
        }
    return result


def print_table(result: dict) -> None:
    cats = list(next(iter(result["methods"].values())))
    print(f"{'method':<18}{'category':<14}{'tok/s':>8}{'speedup':>9}{'tau':>7}{'accept':>8}  identical")
    for label, per in result["methods"].items():
        for c in cats:
            s = per[c]
            print(
                f"{label:<18}{c:<14}{s['tokens_per_s']:>8.2f}{s.get('speedup', 1.0) or 0:>9.2f}"
                f"{s['mean_accepted_length']:>7.2f}{s['acceptance_rate']:>8.2f}  {s.get('identical_to_plain', '')}"
            )
    for label, per in result["methods"].items():
        if "by_source" in per["all"]:
            parts = [
                f"{src} {v['share']:.0%} of rounds, tau {v['tau']:.2f}" for src, v in per["all"]["by_source"].items()
            ]
            print(f"{label}: " + "; ".join(parts))


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in result["methods"] if m != "none"]
    cats = [c for c in next(iter(result["methods"].values())) if c != "all"] + ["all"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(1, len(methods))
    top = 1.0
    for j, m in enumerate(methods):
        vals = [result["methods"][m][c].get("speedup") or 0 for c in cats]
        ax1.bar([i + j * width for i in range(len(cats))], vals, width, label=m)
        top = max(top, *vals)
        acc = result["methods"][m]["all"]["acceptance_by_position"]
        ax2.plot(range(1, len(acc) + 1), acc, marker="o", label=m)
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(cats))], cats, rotation=30, ha="right")
    ax1.set_ylabel("speedup vs plain decoding")
    ax1.set_title(f"{result['model']}: speedup per category (T={result['temperature']})")
    # the legend goes in rows above the tallest bar, so it never hides one
    rows = -(-len(methods) // 4)
    ax1.set_ylim(0, top * (1.08 + 0.1 * rows))
    ax1.legend(fontsize=8, ncol=4, loc="upper left")
    ax2.set_xlabel("draft position")
    ax2.set_ylabel("share of rounds accepting draft i")
    ax2.set_ylim(0, 1)
    ax2.set_title("acceptance by draft position")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
