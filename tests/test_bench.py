"""`aheadlm bench` end to end on a real model: prompt selection, the method sweep, per-category
results that say whether greedy output matched plain decoding, the JSON and the plot."""

import json

import pytest

from aheadlm.bench import parse_methods, read_prompts
from aheadlm.cli import main
from aheadlm.errors import InvalidRequestError

pytestmark = pytest.mark.realmodel


def write_prompts(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_read_prompts_keeps_categories_balanced_and_refuses_bad_lines(tmp_path):
    rows = [{"question_id": i, "category": "ab"[i % 2], "turns": [f"q{i}"]} for i in range(6)]
    path = write_prompts(tmp_path / "p.jsonl", rows)
    assert [p.text for p in read_prompts(path, limit=1)] == ["q0", "q1"]
    assert [p.text for p in read_prompts(path, category="b")] == ["q1", "q3", "q5"]
    assert [p.text for p in read_prompts(path, limit=1, skip=1)] == ["q2", "q3"]
    assert [p.text for p in read_prompts(path, skip=2)] == ["q4", "q5"]
    with pytest.raises(InvalidRequestError, match="negative"):
        read_prompts(path, skip=-1)
    (tmp_path / "bad.jsonl").write_text('{"turns": ["ok"]}\n{"turns": \n')
    with pytest.raises(InvalidRequestError, match=r"bad.jsonl:2: not a Spec-Bench record"):
        read_prompts(str(tmp_path / "bad.jsonl"))


def test_parse_methods_sweeps_k_and_adaptive():
    got = parse_methods("none,ngram", "2,4", adaptive=True)
    assert got == [
        ("none", "none", 1, False, None),
        ("ngram/k2", "ngram", 2, False, None),
        ("ngram/k4", "ngram", 4, False, None),
        ("ngram/adaptive", "ngram", 4, True, None),
    ]


def test_parse_methods_sweeps_thresholds_of_model_drafters_only():
    got = parse_methods("ngram,mtp", "4", adaptive=False, thresholds="0,0.3")
    assert got == [
        ("none", "none", 1, False, None),
        ("ngram", "ngram", 4, False, 0.0),  # lookup has no confidence: one run
        ("mtp/t0", "mtp", 4, False, 0.0),
        ("mtp/t0.3", "mtp", 4, False, 0.3),
    ]
    for ks, ths in (("4", "x"), ("4", "1.5"), ("0", "0"), ("two", "0")):
        with pytest.raises(InvalidRequestError):
            parse_methods("mtp", ks, False, ths)


def test_bench_command_writes_results_and_plot(tmp_path, capsys):
    rows = [
        {"question_id": 1, "category": "coding", "turns": ["Write a Python function that reverses a list."]},
        {"question_id": 2, "category": "qa", "turns": ["What is the capital of France?"]},
    ]
    prompts = write_prompts(tmp_path / "p.jsonl", rows)
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    argv = ["bench", "-m", "smollm2-135m", "--prompts", prompts, "--methods", "ngram", "--max-tokens", "24"]
    assert main(argv + ["--adaptive", "--json", str(out), "--plot", str(png), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["kernels"] in ("avx512", "avx2", "none") and result["threads"] >= 1
    assert list(result["methods"]) == ["none", "ngram", "ngram/adaptive"]
    for label, per_cat in result["methods"].items():
        assert list(per_cat) == ["coding", "qa", "all"]
        everything = per_cat["all"]
        assert everything["completion_tokens"] == sum(per_cat[c]["completion_tokens"] for c in ("coding", "qa"))
        if label == "none":
            assert everything["mean_accepted_length"] == 1.0 and "speedup" not in everything
        else:
            # lossless: greedy speculative output equals plain decoding's, category by category
            assert all(per_cat[c]["identical_to_plain"] for c in per_cat)
            assert everything["speedup"] > 0 and everything["mean_accepted_length"] >= 1.0
            assert everything["target_forwards"] <= result["methods"]["none"]["all"]["target_forwards"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ngram/adaptive" in capsys.readouterr().out
    # a method without a drafter for this model is a clear error, not a traceback
    assert main(argv + ["--methods", "mtp", "--quiet"]) == 1
    assert "no MTP drafter ships" in capsys.readouterr().err
