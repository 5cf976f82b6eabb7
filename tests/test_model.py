"""The raw-PyTorch decoder and its checkpoint I/O against transformers' own models, on random tiny checkpoints.

Run with `pytest -s` to see the largest logits difference per family.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import huggingface_hub.constants
import pytest
import safetensors.torch
import torch
from helpers import ENDOFTEXT_ID, IM_END_ID, LLAMA3_ROPE_SCALING, make_hf_model
from transformers import AutoModelForCausalLM

import ssd

ATOL = RTOL = 1e-5  # fp32; the two implementations run the same ops and agree far more closely than this
SEQ_LEN = 300  # well past LLAMA3_ROPE_SCALING's original_max_position_embeddings (64): the rescaled band is used


def rope_scaling():
    return dict(LLAMA3_ROPE_SCALING)  # a copy: transformers' config writes rope_theta into the dict it is given


# (family, case id, make_hf_model overrides). Each family: tied and untied heads, GQA 1:1, 2:1 and 4:1, both
# config.json forms; Qwen3 also with head_dim != hidden / heads, Llama with and without llama3 rope scaling.
CASES = [
    ("qwen3", "tied-gqa2", {}),
    ("qwen3", "untied-mha-vocab2304", dict(tie_word_embeddings=False, num_key_value_heads=4, vocab_size=2304)),
    ("qwen3", "gqa4-headdim32", dict(num_key_value_heads=1, head_dim=32)),
    ("qwen3", "h96-6heads-gqa2-headdim24-3layers-legacy",
     dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, head_dim=24, num_hidden_layers=3,
          legacy_config=True)),
    ("qwen3", "attention-bias-untied", dict(attention_bias=True, tie_word_embeddings=False)),
    ("qwen2", "untied-gqa2", {}),
    ("qwen2", "tied-gqa4", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    ("qwen2", "mha-legacy", dict(num_key_value_heads=4, legacy_config=True)),
    ("llama", "gqa2", {}),
    ("llama", "mha-tied-legacy", dict(num_key_value_heads=4, tie_word_embeddings=True, legacy_config=True)),
    ("llama", "llama3-rope-gqa2", dict(rope_scaling="llama3")),
    ("llama", "llama3-rope-gqa4-legacy", dict(rope_scaling="llama3", num_key_value_heads=1, legacy_config=True)),
    ("llama", "llama3-rope-attention-bias", dict(rope_scaling="llama3", attention_bias=True, hidden_size=128,
                                                 num_attention_heads=8, num_key_value_heads=4)),
]

MAX_DIFF = defaultdict(float)  # family -> largest |ours - transformers| logit over all cases


@pytest.fixture(scope="module", autouse=True)
def report_max_diff():
    yield
    for family, diff in sorted(MAX_DIFF.items()):
        print(f"\n[logits] {family}: largest |ours - transformers| over all cases = {diff:.3e}")


def build(family, tmp_path, seed=0, **overrides):
    """(path, transformers model, our model) for a random tiny checkpoint."""
    if overrides.get("rope_scaling") == "llama3":
        overrides["rope_scaling"] = rope_scaling()
    path, hf = make_hf_model(family, tmp_path, seed=seed, **overrides)
    model, _ = ssd.load_model(str(path), "cpu", torch.float32)
    return path, hf, model


def random_ids(batch, length, vocab=2048, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def arange_positions(batch, length):
    return torch.arange(length).expand(batch, -1)


@torch.no_grad()
def compare(ours, hf, ids, positions, family, label, hf_positions=True):
    """Assert our logits equal transformers' and record the difference."""
    a = ours(ids, positions).float()
    b = hf(ids, position_ids=positions if hf_positions else None).logits.float()
    diff = (a - b).abs().max().item()
    MAX_DIFF[family] = max(MAX_DIFF[family], diff)
    print(f"[logits] {family} {label}: max |ours - transformers| = {diff:.3e} (max |logit| {b.abs().max():.1f})")
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    return a


def load_hf(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def assert_one_line(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message, f"SSDError message spans lines: {message!r}"
    for w in words:
        assert w.lower() in message.lower(), f"{w!r} not in {message!r}"


# ---------------------------------------------------------------- forward vs transformers ---------------------------

@pytest.mark.parametrize("family,case,overrides", CASES, ids=[f"{f}-{c}" for f, c, _ in CASES])
def test_logits_match_transformers(family, case, overrides, tmp_path):
    path, hf, model = build(family, tmp_path, seed=len(case), **overrides)
    cfg = model.config
    assert cfg.family == family
    assert (model.lm_head is None) == bool(overrides.get("tie_word_embeddings", family == "qwen3"))
    ids = random_ids(2, SEQ_LEN, seed=1)
    compare(model, hf, ids, arange_positions(2, SEQ_LEN), family, case, hf_positions=False)
    torch.testing.assert_close(model.inv_freq, hf.model.rotary_emb.inv_freq.float(), atol=0, rtol=1e-6)
    if overrides.get("rope_scaling"):
        # The scaling must matter at these lengths: with the plain frequencies the logits move far off.
        assert cfg.rope_scaling is not None
        plain = ssd.rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
        assert not torch.allclose(plain, model.inv_freq)
        model.inv_freq = plain
        with torch.no_grad():
            off = (model(ids, arange_positions(2, SEQ_LEN)) - hf(ids).logits).abs().max().item()
        assert off > 1e-2, f"rope scaling made no difference ({off})"


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_bf16_logits_match_transformers(family, tmp_path):
    """A bf16 checkpoint (as real ones are) loaded in bf16 by both: rope angles stay fp32, norms compute in fp32."""
    extra = dict(rope_scaling=rope_scaling()) if family == "llama" else {}
    path, _ = make_hf_model(family, tmp_path, seed=5, dtype=torch.bfloat16, **extra)
    model, _ = ssd.load_model(str(path), "cpu", torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = random_ids(2, SEQ_LEN, seed=6)
    with torch.no_grad():
        a = model(ids, arange_positions(2, SEQ_LEN)).float()
        b = hf(ids).logits.float()
    diff = (a - b).abs().max().item()
    print(f"[logits] {family} bf16: max |ours - transformers| = {diff:.3e} (max |logit| {b.abs().max():.1f})")
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_explicit_positions_match_transformers(family, tmp_path):
    """Per-row positions: rows offset by different amounts, as when a sequence continues after a prefix."""
    extra = dict(rope_scaling="llama3") if family == "llama" else {}
    _, hf, model = build(family, tmp_path, seed=3, **extra)
    ids = random_ids(3, 120, seed=2)
    positions = torch.arange(120)[None, :] + torch.tensor([[0], [37], [250]])
    compare(model, hf, ids, positions, family, "offset positions")


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_right_padded_rows_match_single_rows(family, tmp_path):
    """Rows of different lengths in one right-padded batch, each with positions from 0: the real tokens' logits
    equal transformers' logits for the row alone (padding never reaches a real token under the causal mask)."""
    extra = dict(rope_scaling="llama3") if family == "llama" else {}
    _, hf, model = build(family, tmp_path, seed=4, **extra)
    lengths = [90, 17, 140]
    ids = random_ids(3, max(lengths), seed=5)
    for b, n in enumerate(lengths):
        ids[b, n:] = 0
    with torch.no_grad():
        batch = model(ids, arange_positions(3, max(lengths)))
        for b, n in enumerate(lengths):
            ref = hf(ids[b:b + 1, :n], position_ids=torch.arange(n)[None]).logits[0]
            torch.testing.assert_close(batch[b, :n], ref, atol=ATOL, rtol=RTOL)


def test_load_builds_real_tensors(tmp_path):
    """load_model builds on the meta device: nothing may stay there, and inv_freq is recomputed in fp32."""
    path, hf = make_hf_model("llama", tmp_path, rope_scaling=rope_scaling())
    for dtype in (torch.float32, torch.bfloat16):
        model, tokenizer = ssd.load_model(str(path), "cpu", dtype)
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            assert not t.is_meta and t.device.type == "cpu", name
            assert torch.isfinite(t).all(), name
        assert all(p.dtype == dtype for p in model.parameters())
        assert model.inv_freq.dtype == torch.float32
        torch.testing.assert_close(model.inv_freq, hf.model.rotary_emb.inv_freq.float(), atol=0, rtol=1e-6)
        assert not model.training
    torch.testing.assert_close(model.model.embed_tokens.weight.float(),
                               hf.model.embed_tokens.weight.to(torch.bfloat16).float(), atol=0, rtol=0)


def test_load_does_not_import_dynamo(tiny_model_dir):
    """Building on the meta device must stay off torch's Python references (nn.Embedding's normal_, division), which
    import torch._dynamo: ~150 MiB and over a second per process. A fresh interpreter, so other tests' imports can't
    mask it; a plain Transformer on the CPU still gets a random embedding table."""
    dirs = [str(tiny_model_dir), str(tiny_model_dir) + "-moe"]
    code = ("import sys, torch, ssd\n"
            f"for d in {dirs!r}: ssd.load_model(d, 'cpu', torch.float32)\n"
            "cfg = ssd.model_config_from_hf(dict(model_type='qwen3', vocab_size=64, hidden_size=16, "
            "intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8))\n"
            "assert ssd.Transformer(cfg).model.embed_tokens.weight.std() > 0.5\n"
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(ssd.__file__).parent)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_model_config_fields(tiny_model_dir):
    model, tokenizer = ssd.load_model(str(tiny_model_dir), "cpu", torch.float32)
    cfg = model.config
    assert (cfg.family, cfg.vocab_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == \
        ("qwen3", 2048, 2, 4, 2, 16)
    assert cfg.eos_token_ids == [IM_END_ID, ENDOFTEXT_ID]  # generation_config.json's list, then the tokenizer's
    assert cfg.max_position_embeddings == 2048
    assert cfg.tie_word_embeddings and model.lm_head is None
    assert tokenizer.eos_token_id == IM_END_ID


@pytest.mark.parametrize("generation_eos,expected", [(ENDOFTEXT_ID, [ENDOFTEXT_ID, IM_END_ID]),
                                                     ([IM_END_ID, 7], [IM_END_ID, 7]), (None, [IM_END_ID])])
def test_eos_ids_merge_generation_config_and_tokenizer(generation_eos, expected, tmp_path):
    """eos_token_ids: generation_config.json's eos_token_id (int or list), then the tokenizer's; a save keeps all."""
    path, _ = make_hf_model("qwen3", tmp_path / "src")
    if generation_eos is None:
        (path / "generation_config.json").unlink()
    else:
        gen = json.loads((path / "generation_config.json").read_text())
        (path / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": generation_eos}))
    model, tokenizer = ssd.load_model(str(path), "cpu", torch.float32)
    assert model.config.eos_token_ids == expected
    ssd.save_model(model, tokenizer, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == expected
    assert ssd.load_model(str(tmp_path / "out"), "cpu", torch.float32)[0].config.eos_token_ids == expected


# ---------------------------------------------------------------- save ----------------------------------------------

SAVE_CASES = [("qwen3", {}), ("qwen2", {}), ("llama", dict(rope_scaling="llama3", legacy_config=True))]


@pytest.mark.parametrize("family,overrides", SAVE_CASES, ids=[f for f, _ in SAVE_CASES])
def test_save_roundtrip(family, overrides, tmp_path):
    path, _, model = build(family, tmp_path / "src", **overrides)
    tokenizer = ssd.load_model(str(path), "cpu", torch.float32)[1]
    out = tmp_path / "out"
    ssd.save_model(model, tokenizer, out)
    ids, positions = random_ids(2, 150, seed=7), arange_positions(2, 150)
    compare(model, load_hf(out), ids, positions, family, "saved, reloaded by transformers", hf_positions=False)
    reloaded, tok2 = ssd.load_model(str(out), "cpu", torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, positions), model(ids, positions), atol=0, rtol=0)
    assert reloaded.config.eos_token_ids == model.config.eos_token_ids == [IM_END_ID, ENDOFTEXT_ID]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [IM_END_ID, ENDOFTEXT_ID]
    assert tok2.encode("def f(x):\n    return x") == tokenizer.encode("def f(x):\n    return x")
    keys = safetensors.torch.load_file(out / "model.safetensors").keys()
    assert ("lm_head.weight" in keys) == (model.lm_head is not None)
    assert "inv_freq" not in keys
    assert not (out / ".tmp-save").exists()
    if overrides.get("rope_scaling"):
        assert reloaded.config.rope_scaling is not None


def test_save_tied_has_no_lm_head(tiny_model_dir, tmp_path):
    model, tokenizer = ssd.load_model(str(tiny_model_dir), "cpu", torch.float32)
    ssd.save_model(model, tokenizer, tmp_path)
    keys = set(safetensors.torch.load_file(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is True


def test_save_bf16_keeps_dtype(tiny_model_dir, tmp_path):
    model, tokenizer = ssd.load_model(str(tiny_model_dir), "cpu", torch.bfloat16)
    ssd.save_model(model, tokenizer, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    tensors = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    again, _ = ssd.load_model(str(tmp_path), "cpu", torch.bfloat16)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_sharded_save(tmp_path):
    path, _, model = build("llama", tmp_path / "src")  # untied: ~1.3 MB of fp32 weights
    tokenizer = ssd.load_model(str(path), "cpu", torch.float32)[1]
    out = tmp_path / "out"
    ssd.save_model(model, tokenizer, out, max_shard_bytes=300_000)
    shards = sorted(f.name for f in out.glob("model-*.safetensors"))
    n = len(shards)
    assert n >= 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == {k for k in model.state_dict() if k != "inv_freq"}
    for shard in shards:  # no shard above the limit unless it holds a single larger tensor
        tensors = safetensors.torch.load_file(out / shard)
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 300_000
    ids, positions = random_ids(2, 100, seed=8), arange_positions(2, 100)
    compare(model, load_hf(out), ids, positions, "llama", "sharded save, reloaded by transformers", False)
    reloaded, _ = ssd.load_model(str(out), "cpu", torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, positions), model(ids, positions), atol=0, rtol=0)
    # Saving unsharded into the same folder removes the stale shards and their index.
    ssd.save_model(model, tokenizer, out)
    assert sorted(f.name for f in out.glob("model*")) == ["model.safetensors"]
    compare(model, load_hf(out), ids, positions, "llama", "unsharded re-save, reloaded by transformers", False)
    # And sharding again over an unsharded save removes model.safetensors.
    ssd.save_model(model, tokenizer, out, max_shard_bytes=300_000)
    assert not (out / "model.safetensors").exists()
    assert ssd.load_model(str(out), "cpu", torch.float32)[0] is not None


class Crash(Exception):
    pass


def crash_on_call(n, real):
    """A stand-in for `real` that raises Crash on its n-th call (counting from 1)."""
    calls = [0]

    def fake(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise Crash(f"simulated crash on call {n}")
        return real(*args, **kwargs)
    return fake


@pytest.mark.parametrize("where,n", [("save_file", 1), ("save_file", 2), ("replace", 1), ("replace", 3),
                                     ("replace", 5)])
def test_save_is_atomic(where, n, tmp_path, monkeypatch):
    """A crash anywhere in save_model leaves the old model loadable with its old weights, or no config.json."""
    _, _, old = build("qwen3", tmp_path / "a", seed=1, tie_word_embeddings=False)
    path, _, new = build("qwen3", tmp_path / "b", seed=2, tie_word_embeddings=False)
    tokenizer = ssd.load_model(str(path), "cpu", torch.float32)[1]
    out = tmp_path / "out"
    ssd.save_model(old, tokenizer, out, max_shard_bytes=300_000)  # sharded, so crashes can hit between shards
    ids, positions = random_ids(1, 50, seed=9), arange_positions(1, 50)
    with torch.no_grad():
        old_logits = old(ids, positions)
    if where == "save_file":
        monkeypatch.setattr(safetensors.torch, "save_file", crash_on_call(n, safetensors.torch.save_file))
    else:
        monkeypatch.setattr(os, "replace", crash_on_call(n, os.replace))
    with pytest.raises(Crash):
        ssd.save_model(new, tokenizer, out, max_shard_bytes=300_000)
    monkeypatch.undo()
    if (out / "config.json").exists():
        loaded, _ = ssd.load_model(str(out), "cpu", torch.float32)  # must be the whole old model
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids, positions), old_logits, atol=0, rtol=0)
    else:
        with pytest.raises(ssd.SSDError):
            ssd.load_model(str(out), "cpu", torch.float32)
    # The next save succeeds and cleans up.
    ssd.save_model(new, tokenizer, out)
    loaded, _ = ssd.load_model(str(out), "cpu", torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, positions), new(ids, positions), atol=0, rtol=0)
    assert not (out / ".tmp-save").exists() and not list(out.glob("model-*"))


# ---------------------------------------------------------------- load errors ---------------------------------------

def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_unsupported_architecture(tmp_path):
    path, _ = make_hf_model("llama", tmp_path)
    edit_config(path, model_type="mistral", architectures=["MistralForCausalLM"])
    with pytest.raises(ssd.SSDError) as e:
        ssd.load_model(str(path), "cpu", torch.float32)
    assert_one_line(e, "unsupported architecture", "MistralForCausalLM", "qwen3", "llama")


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_sliding_window_is_refused_where_it_would_bind(family, tmp_path):
    """transformers attends within a window on the layers at and above max_window_layers: our full attention would give
    other logits past the window, so such a config is refused in one line. A window wider than the context never binds
    and loads, with transformers' logits."""
    path, _ = make_hf_model(family, tmp_path, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    with pytest.raises(ssd.SSDError) as e:
        ssd.load_model(str(path), "cpu", torch.float32)
    assert_one_line(e, "sliding-window", "16-token")
    path, hf = make_hf_model(family, tmp_path / "wide", use_sliding_window=True, sliding_window=4096,
                             max_window_layers=0)
    model, _ = ssd.load_model(str(path), "cpu", torch.float32)
    compare(model, hf, random_ids(1, 40, seed=3), arange_positions(1, 40), family, "wide-window", hf_positions=False)


@pytest.mark.parametrize("legacy", [False, True])
def test_unsupported_rope_type(legacy, tmp_path):
    path, _ = make_hf_model("llama", tmp_path, legacy_config=legacy, rope_scaling=rope_scaling())
    config = json.loads((path / "config.json").read_text())
    key = "rope_scaling" if legacy else "rope_parameters"
    config[key] = {**config[key], "rope_type": "yarn"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ssd.SSDError) as e:
        ssd.load_model(str(path), "cpu", torch.float32)
    assert_one_line(e, "unsupported rope_type", "yarn")


def test_directory_without_config(tmp_path):
    path, _ = make_hf_model("qwen3", tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(ssd.SSDError) as e:
        ssd.load_model(str(path), "cpu", torch.float32)
    assert_one_line(e, "config.json", str(path))


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ssd.SSDError) as e:
        ssd.load_model(str(missing), "cpu", torch.float32)
    assert_one_line(e, str(missing), "neither a model directory nor a hub id")


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    start = time.perf_counter()
    with pytest.raises(ssd.SSDError) as e:
        ssd.load_model("ssd-tests-nonexistent-org/no-such-model", "cpu", torch.float32)
    assert time.perf_counter() - start < 10
    assert_one_line(e, "ssd-tests-nonexistent-org/no-such-model", "Hugging Face Hub", "local model directory")


def rewrite_weights(path, edit):
    tensors = safetensors.torch.load_file(path / "model.safetensors")
    edit(tensors)
    safetensors.torch.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor(tmp_path):
    path, _ = make_hf_model("qwen2", tmp_path)
    rewrite_weights(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ssd.SSDError) as e:
        ssd.load_model(str(path), "cpu", torch.float32)
    assert_one_line(e, "missing", "model.layers.1.self_attn.k_proj.bias")


def test_extra_tensor(tmp_path):
    path, _ = make_hf_model("qwen3", tmp_path)
    rewrite_weights(path, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(3)}))
    with pytest.raises(ssd.SSDError) as e:
        ssd.load_model(str(path), "cpu", torch.float32)
    assert_one_line(e, "unexpected", "model.layers.0.mlp.extra.weight")


def test_wrong_shape(tmp_path):
    path, _ = make_hf_model("llama", tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    rewrite_weights(path, lambda t: t.update({name: t[name][:32].clone()}))
    with pytest.raises(ssd.SSDError) as e:
        ssd.load_model(str(path), "cpu", torch.float32)
    assert_one_line(e, name, "(32, 64)", "(64, 64)")


def test_missing_safetensors(tmp_path):
    path, _ = make_hf_model("qwen3", tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ssd.SSDError) as e:
        ssd.load_model(str(path), "cpu", torch.float32)
    assert_one_line(e, "safetensors", str(path))


def test_missing_shard(tmp_path):
    path, _, model = build("llama", tmp_path / "src")
    out = tmp_path / "out"
    ssd.save_model(model, ssd.load_model(str(path), "cpu", torch.float32)[1], out, max_shard_bytes=300_000)
    sorted(out.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(ssd.SSDError) as e:
        ssd.load_model(str(out), "cpu", torch.float32)
    assert_one_line(e, "safetensors")


# ---------------------------------------------------------------- CLI -----------------------------------------------

def test_parse_args_defaults():
    assert ssd.parse_args([]) == ssd.Config()


def test_parse_args_maps_flags():
    cfg = ssd.parse_args(["--model_name_or_path", "some/model", "--temperature", "0.7", "--top_k", "5",
                          "--top_p", "0.95", "--num_samples", "4", "--learning_rate", "1e-5", "--max_steps", "10",
                          "--chat_template_kwargs", '{"enable_thinking": false}', "--no-filter_empty",
                          "--sample_only", "--no-bf16", "--no-gradient_checkpointing"])
    expected = dataclasses.replace(ssd.Config(), model_name_or_path="some/model", temperature=0.7, top_k=5, top_p=0.95,
                                   num_samples=4, learning_rate=1e-5, max_steps=10,
                                   chat_template_kwargs='{"enable_thinking": false}', filter_empty=False,
                                   sample_only=True, bf16=False, gradient_checkpointing=False)
    assert cfg == expected
    assert isinstance(cfg.top_k, int) and isinstance(cfg.temperature, float)


def test_parse_args_every_bool_has_no_form():
    bools = [f for f in dataclasses.fields(ssd.Config) if f.type in (bool, "bool")]
    assert bools
    for f in bools:
        assert getattr(ssd.parse_args([f"--no-{f.name}"]), f.name) is False
        assert getattr(ssd.parse_args([f"--{f.name}"]), f.name) is True


def test_parse_args_rejects_bad_values(capsys):
    with pytest.raises(SystemExit):
        ssd.parse_args(["--top_k", "many"])
    with pytest.raises(SystemExit):
        ssd.parse_args(["--no_such_flag", "1"])
