"""Bad input gives one clear line: typed exceptions from the API, exit code 1 from the CLI."""

import json
import shutil

import numpy as np
import pytest

import aheadlm
from aheadlm.cli import main
from aheadlm.errors import (
    ContextLengthError,
    InvalidRequestError,
    ModelNotFoundError,
    UnsupportedModelError,
    WeightsError,
)
from aheadlm.registry import resolve


def write_gguf(path, arch="llama", tensor_type=None):
    """A tiny GGUF with llama-style metadata and one embedding tensor."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(1)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(64)
    if tensor_type is None:
        w.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float32))
    else:
        _, nbytes = gguf.GGML_QUANT_SIZES[tensor_type]
        raw = np.zeros((64, 32 // 32 * nbytes), dtype=np.uint8)
        w.add_tensor("token_embd.weight", raw, raw_dtype=tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def cli(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr().err


def test_missing_model(capsys):
    with pytest.raises(ModelNotFoundError):
        aheadlm.load("/nonexistent/model.gguf")
    code, err = cli(capsys, "generate", "hi", "--model", "no-such-model")
    assert code == 1 and err.startswith("error: model 'no-such-model' not found") and "Traceback" not in err


def test_truncated_gguf(tmp_path, capsys):
    src = resolve("smollm2-135m")
    bad = tmp_path / "truncated.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(src.stat().st_size // 2))
    with pytest.raises(WeightsError, match="truncated"):
        aheadlm.load(bad)
    code, err = cli(capsys, "generate", "hi", "--model", str(bad))
    assert code == 1 and "truncated" in err and err.count("\n") == 1


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"not a model at all" * 100)
    with pytest.raises(WeightsError, match="not a GGUF"):
        aheadlm.load(bad)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(WeightsError):
        aheadlm.load(header_only)


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "mamba.gguf"
    write_gguf(p, arch="mamba")
    with pytest.raises(UnsupportedModelError, match="architecture 'mamba'"):
        aheadlm.load(p)


def test_unsupported_tensor_type(tmp_path):
    import gguf

    p = tmp_path / "q81.gguf"
    write_gguf(p, tensor_type=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(UnsupportedModelError, match="Q8_1"):
        aheadlm.load(p)


def test_hf_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        aheadlm.load(tmp_path)


def test_hf_folder_unsupported_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(UnsupportedModelError, match="gpt_neox"):
        aheadlm.load(tmp_path)


def test_corrupt_cache_is_reported(tmp_path):
    from aheadlm.checkpoint import _gguf_cache_path

    aheadlm.load("smollm2-135m")  # make sure the cache exists
    copy = tmp_path / "cached"
    shutil.copytree(_gguf_cache_path(resolve("smollm2-135m")), copy)
    st = copy / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="delete the folder"):
        aheadlm.load(copy)


@pytest.fixture(scope="module")
def small_llm():
    return aheadlm.load("smollm2-135m", n_ctx=64)


def test_prompt_longer_than_context(small_llm, capsys):
    with pytest.raises(ContextLengthError, match="context holds 64"):
        small_llm.generate("word " * 100, max_tokens=4)
    code, err = cli(capsys, "generate", "word " * 100, "-m", "smollm2-135m", "--n-ctx", "64")
    assert code == 1 and "context holds 64" in err


def test_generation_stops_at_context_end(small_llm):
    out = small_llm.generate("Count: 1, 2, 3,", max_tokens=500, ignore_eos=True)
    prompt_len = len(small_llm.tokenizer.encode("Count: 1, 2, 3,"))
    assert out.finish_reason == "length"
    assert prompt_len + len(out.token_ids) == 64


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1.0},
        {"temperature": float("nan")},
        {"top_p": 1.5},
        {"top_k": -3},
        {"min_p": 2},
        {"repetition_penalty": 0.0},
        {"max_tokens": 0},
    ],
)
def test_bad_sampling_values(small_llm, kwargs):
    args = {"max_tokens": 4, **kwargs}
    with pytest.raises(InvalidRequestError):
        small_llm.generate("hi", **args)


def test_bad_prompt_types(small_llm):
    with pytest.raises(InvalidRequestError):
        small_llm.generate(["a", "b"], max_tokens=2)
    with pytest.raises(InvalidRequestError):
        small_llm.generate([10**9], max_tokens=2)
    with pytest.raises(InvalidRequestError):
        small_llm.chat([], max_tokens=2)


def test_bad_dtype(capsys):
    code, err = cli(capsys, "generate", "hi", "-m", "smollm2-135m", "--dtype", "int3")
    assert code == 1 and "unknown dtype" in err
