"""Command line: `aheadlm generate | chat | models | bench | perplexity | serve | train-drafter |
export-drafter`.

aheadlm generate "The history of the printing press begins" --max-tokens 64 --stats
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from .errors import AheadlmError, ContextLengthError, InvalidRequestError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default="gemma3-270m", help="registered name, GGUF file or HF folder")
    p.add_argument("--dtype", default=None, help="float32 (default) or bfloat16")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--n-ctx", type=int, default=None, help="context size (default: the model's)")
    p.add_argument(
        "--kv-dtype", default=None, help="KV cache: float32 or bfloat16 (half the memory and reads; default: --dtype)"
    )


def _add_draft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--drafter",
        "-d",
        default=None,
        help="none | ngram | mtp | draft:MODEL | a drafter folder (default: the model's shipped MTP drafter)",
    )
    p.add_argument(
        "--draft-tokens",
        "-k",
        type=int,
        default=None,
        help="most draft tokens per round (default: the model's measured default with no --drafter, else 4)",
    )
    p.add_argument(
        "--adaptive",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="choose k per round for the best measured speed (default: as measured best for the model)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="draft only while the drafter's confidence is at least this (default: the MTP drafter's own, "
        "chosen when it was trained; 0 behind lookup)",
    )
    p.add_argument(
        "--fallback-k", type=int, default=None, help="with ngram+X: most drafts of X when lookup finds nothing"
    )


def _bias(text: str) -> tuple[int, float]:
    """`ID=BIAS` of `--logit-bias`."""
    tok, _, value = text.partition("=")
    try:
        return int(tok), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID=BIAS, got {text!r}") from None


def _schema(text: str) -> dict:
    """`--json-schema`: the schema itself, or @FILE holding it."""
    try:
        if text.startswith("@"):
            with open(text[1:], encoding="utf-8") as f:
                text = f.read()
        schema = json.loads(text)
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"not a readable JSON schema: {e}") from None
    if not isinstance(schema, dict):
        raise argparse.ArgumentTypeError("a JSON schema must be an object")
    return schema


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=256)
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--presence-penalty", type=float, default=0.0, help="-2..2, once per token the output holds")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="-2..2, per occurrence in the output")
    p.add_argument(
        "--logit-bias",
        type=_bias,
        action="append",
        default=None,
        metavar="ID=BIAS",
        help="added to a token's logit (repeatable)",
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--json-mode", action="store_true", help="constrain the output to one JSON object")
    p.add_argument(
        "--json-schema", type=_schema, default=None, metavar="SCHEMA", help="constrain the output to this JSON schema"
    )


def _sampling_kwargs(a: argparse.Namespace) -> dict:
    return dict(
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        min_p=a.min_p,
        repetition_penalty=a.repetition_penalty,
        presence_penalty=a.presence_penalty,
        frequency_penalty=a.frequency_penalty,
        logit_bias=dict(a.logit_bias) if a.logit_bias else None,
        seed=a.seed,
        stop=a.stop,
        json_mode=a.json_mode,
        json_schema=a.json_schema,
    )


def _load(a: argparse.Namespace):
    from .api import load

    return load(
        a.model,
        drafter=a.drafter,
        draft_tokens=a.draft_tokens,
        adaptive=a.adaptive,
        threshold=a.threshold,
        fallback_k=a.fallback_k,
        dtype=a.dtype,
        device=a.device,
        n_ctx=a.n_ctx,
        kv_dtype=a.kv_dtype,
    )


def _read_stdin() -> str:
    if sys.stdin is None:  # started with standard input closed (`<&-`)
        raise InvalidRequestError("no standard input to read the prompt from")
    try:
        return sys.stdin.read()
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"standard input is not valid text in {sys.stdin.encoding} ({e.reason})") from None


def cmd_generate(a: argparse.Namespace) -> int:
    from .engine import GenerationStats

    prompt = _read_stdin() if a.prompt == "-" else a.prompt
    llm = _load(a)
    stats = GenerationStats()
    kwargs = _sampling_kwargs(a)
    stream = (
        llm.stream_chat([{"role": "user", "content": prompt}], stats=stats, **kwargs)
        if a.chat
        else llm.stream(prompt, stats=stats, **kwargs)
    )
    text, ids, reason = [], [], None
    for step in stream:
        text.append(step.text)
        ids.extend(step.token_ids)
        reason = step.finish_reason
        if not a.json:
            sys.stdout.write(step.text)
            sys.stdout.flush()
    if a.json:
        out = {"model": llm.name, "text": "".join(text), "token_ids": ids, "finish_reason": reason}
        out["stats"] = stats.to_dict()
        print(json.dumps(out))
    else:
        sys.stdout.write("\n")
        if a.stats:
            s = stats.to_dict()
            print(
                f"[{s['completion_tokens']} tokens, {s['tokens_per_s']} tok/s, prefill {s['prefill_s']}s, "
                f"finish={reason}, tau={s['mean_accepted_length']}, "
                f"acceptance={s['acceptance_rate']}, by position={s['acceptance_by_position']}, "
                f"target forwards={s['target_forwards']}, time target/draft/other="
                f"{s['time_target_s']}/{s['time_draft_s']}/{s['time_other_s']}s, rounds by drafter "
                f"[rounds, drafted, accepted]={s['by_source']}]",
                file=sys.stderr,
            )
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    if sys.stdin is None:  # checked before the slow load; input() would fail with "lost sys.stdin"
        raise InvalidRequestError("no standard input to read chat messages from")
    llm = _load(a)
    history: list[dict] = []
    if a.system:
        history.append({"role": "system", "content": a.system})
    print(
        f"aheadlm chat with {llm.name}. /reset clears the conversation, Ctrl-C stops a reply, /exit or Ctrl-D quits.",
        file=sys.stderr,
    )
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if a.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = []
        try:
            for step in llm.stream_chat(history, **_sampling_kwargs(a)):
                reply.append(step.text)
                sys.stdout.write(step.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            # Ctrl-C stops this reply only. What was shown stays in the history, so the model sees
            # the conversation the user saw; a turn interrupted before any text is dropped whole.
            sys.stdout.write("\n")
            if "".join(reply).strip():
                history.append({"role": "assistant", "content": "".join(reply).strip()})
            else:
                history.pop()
            continue
        except AheadlmError as e:  # one bad turn (a conversation past the context, bad text) keeps the session
            history.pop()
            hint = " (/reset starts a new conversation)" if isinstance(e, ContextLengthError) else ""
            print(f"error: {e}{hint}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply).strip()})


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else str(n)


def cmd_models(a: argparse.Namespace) -> int:
    from .checkpoint import read_config, summary
    from .registry import REGISTRY, installed, resolve_registered

    rows = []
    for name, reg in [] if a.paths else REGISTRY.items():
        row = {"name": name, "description": reg.description, "installed": installed(name)}
        if row["installed"]:
            path = resolve_registered(name)
            row["path"] = str(path)
            row["file_mb"] = round(path.stat().st_size / 2**20, 1)
            row.update(summary(read_config(path)))
        else:
            row["install"] = reg.install
        rows.append(row)
    for p in a.paths:
        rows.append({"name": Path(p).name, "path": p, "installed": True, **summary(read_config(p))})
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        if not r["installed"]:
            print(f"{r['name']:<14} {r.get('description', ''):<36} not installed: {r['install']}")
            continue
        kv = next(v for k, v in r.items() if k.startswith("kv_cache_mib_"))
        print(
            f"{r['name']:<14} {r['arch']:<7} {_count(r['params']):>7} params  weights {r['weights_gib_bf16']} GiB bf16"
            f" / {r['weights_gib_fp32']} GiB fp32  KV {kv} MiB per 4k tokens  {r['path']}"
        )
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import plot, print_table, run_bench

    # Refuse unusable output paths now, not after a run of an hour.
    for flag, path in (("--json", a.json), ("--plot", a.plot)):
        if path and Path(path).is_dir():
            raise InvalidRequestError(f"{flag} {path} is a folder; give a file name")
    if a.plot and Path(a.plot).suffix:  # no suffix: matplotlib writes a PNG
        from matplotlib.backend_bases import FigureCanvasBase

        kinds = FigureCanvasBase.get_supported_filetypes()
        if Path(a.plot).suffix.lower()[1:] not in kinds:
            raise InvalidRequestError(f"--plot {a.plot}: matplotlib writes {', '.join(sorted(kinds))}")
    result = run_bench(a)
    print_table(result)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1))
    if a.plot:
        plot(result, a.plot)
    return 0


def cmd_perplexity(a: argparse.Namespace) -> int:
    from .api import load, resolve_dtype
    from .perplexity import perplexity

    try:
        text = Path(a.file).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"{a.file} is not UTF-8 text ({e.reason})") from None
    resolve_dtype(a.dtype)  # a bad --dtype fails before the model loads
    llm = load(a.model, drafter="none", dtype=a.dtype, device=a.device, n_ctx=a.n_ctx, kv_dtype=a.kv_dtype)
    tok = llm.tokenizer
    tokens = tok.encode(text)
    bos = tok.bos_id if tok.add_bos else None
    last = None
    for w in perplexity(llm.engine, tokens, a.ctx, bos, a.chunks):
        last = w
        if not a.json:
            print(f"[{w.index}]{w.ppl:.4f}", end="," if w.index < w.windows else "\n", flush=True)
    out = {
        "model": llm.name,
        "file": a.file,
        "ctx": a.ctx,
        "windows": last.windows,
        "tokens_scored": last.tokens,
        "ppl": last.ppl,
        "ppl_error": last.ppl_error,
        "seconds": last.seconds,
    }
    if a.json:
        print(json.dumps(out))
    else:
        print(
            f"PPL = {last.ppl:.4f} +/- {last.ppl_error:.4f} ({last.tokens} tokens in {last.windows} windows of "
            f"{a.ctx}, {last.seconds:.1f} s)"
        )
    return 0


def cmd_export_drafter(a: argparse.Namespace) -> int:
    from .checkpoint import hf_config, hf_folder_weights
    from .drafter import load_drafter
    from .errors import UnsupportedModelError
    from .gemma4_assistant import export_assistant

    if not Path(a.model).is_dir():
        raise UnsupportedModelError(f"{a.model}: export-drafter needs the Gemma 4 target's Hugging Face folder")
    config = hf_config(Path(a.model))
    name = "embed.weight" if config.tie_embeddings else "lm_head.weight"
    head = dict(hf_folder_weights(Path(a.model), config, only={name}))[name]  # only the output head is read
    drafter = load_drafter(a.drafter, config)
    out = export_assistant(drafter, config, head, a.out)
    print(f"wrote a gemma4_assistant drafter to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aheadlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete a prompt (streams to stdout)")
    g.add_argument("prompt", help="prompt text, or - to read stdin")
    _add_model_args(g)
    _add_draft_args(g)
    _add_sampling_args(g)
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user chat message")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    g.add_argument("--stats", action="store_true", help="print speed and acceptance statistics")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive streaming chat")
    _add_model_args(c)
    _add_draft_args(c)
    _add_sampling_args(c)
    c.add_argument("--system", default=None, help="system message")
    c.set_defaults(func=cmd_chat)

    b = sub.add_parser("bench", help="speed and acceptance of decoding methods on a prompt set")
    b.add_argument("--model", "-m", default="gemma3-270m")
    b.add_argument("--prompts", required=True, help="Spec-Bench jsonl or a text file with one prompt per line")
    b.add_argument("--category", default=None)
    b.add_argument("--limit", type=int, default=None, help="at most N prompts per category")
    b.add_argument("--skip", type=int, default=0, help="skip the first N prompts of each category")
    b.add_argument("--methods", default="none,mtp,ngram", help="comma list: none, mtp, ngram, draft:MODEL, folder")
    b.add_argument("--max-tokens", type=int, default=256)
    b.add_argument("--temperature", type=float, default=0.0)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--draft-tokens", default="4", help="k, or a comma list to sweep (e.g. 2,4,6)")
    b.add_argument("--adaptive", action="store_true", help="also run each method with adaptive k")
    b.add_argument(
        "--threshold",
        default=None,
        help="draft only while the drafter's confidence is at least this (default: the MTP drafter's own); "
        "a comma list sweeps",
    )
    b.add_argument("--fallback-k", type=int, default=None, help="with ngram+X: most drafts of X (default: k)")
    b.add_argument("--dtype", default=None)
    b.add_argument("--device", default=None)
    b.add_argument("--json", default=None, help="write results here")
    b.add_argument("--plot", default=None, help="write a PNG: speedup per category, acceptance by position")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_bench)

    from .server import cli as server_cli
    from .train import cli as train_cli

    sv = sub.add_parser("serve", help="OpenAI- and Ollama-compatible HTTP server")
    server_cli.add_arguments(sv)
    sv.set_defaults(func=server_cli.run)

    t = sub.add_parser("train-drafter", help="train an MTP drafter by self-distillation")
    train_cli.add_arguments(t)
    t.set_defaults(func=train_cli.run)

    e = sub.add_parser("export-drafter", help="write a trained drafter as a Gemma 4 assistant (transformers, vLLM)")
    e.add_argument("--model", "-m", required=True, help="the Gemma 4 target (Hugging Face folder)")
    e.add_argument("--drafter", required=True, help="drafter folder written by train-drafter")
    e.add_argument("--out", required=True, help="output folder (gemma4_assistant layout)")
    e.set_defaults(func=cmd_export_drafter)

    pp = sub.add_parser("perplexity", help="perplexity of a text file, as llama.cpp's llama-perplexity measures it")
    _add_model_args(pp)
    pp.add_argument("--file", "-f", required=True, help="a UTF-8 text file")
    pp.add_argument("--ctx", type=int, default=512, help="window size; its second half is scored (default 512)")
    pp.add_argument("--chunks", type=int, default=None, help="score at most this many windows")
    pp.add_argument("--json", action="store_true", help="print one JSON object")
    pp.set_defaults(func=cmd_perplexity)

    m = sub.add_parser("models", help="list registered models, or describe model files/folders")
    m.add_argument("paths", nargs="*", help="GGUF files or Hugging Face folders to describe instead")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    # A terminal or pipe that cannot encode some characters (cp1252, ascii) shows "?" for them
    # instead of the stream dying with UnicodeEncodeError mid-reply.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AheadlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`| head`). As the Python docs advise, point stdout at devnull so the
        # interpreter's final flush does not fail again, and exit quietly with 141, the status of a
        # Unix tool killed by SIGPIPE, so `set -o pipefail` scripts see what they expect.
        with contextlib.suppress(OSError, ValueError, AttributeError):  # no real file behind stdout (tests)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # the file system's answer (a file where a folder should be, no space) is the message
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
