"""LoRA (--lora_r): our adapters against PEFT's on transformers' models (logits, one step's gradients), the output
PEFT loads, the merged output, kill-and-resume, rounds, FSDP over two ranks, and the settings that are refused.
peft is a test-only dependency."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import make_hf_model
from safetensors.torch import load_file
from test_train import REPO, base_argv, make_records, metrics, prepare_run, run_cli, tiny_seqs, weights

import ssd

peft = pytest.importorskip("peft")
LORA = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0)


def peft_lora(path, targets=ssd.LORA_TARGETS, seed=0, **lora):
    """transformers' model at `path` under peft's LoRA with random A and B (B is zero at PEFT's start, which would
    hide any mistake on the adapter path): (the peft model, its adapter as PEFT saves it)."""
    from transformers import AutoModelForCausalLM
    lora = {**LORA, **lora}
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=lora["lora_r"], lora_alpha=lora["lora_alpha"],
                                                    lora_dropout=lora["lora_dropout"], target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    return model.eval(), peft.get_peft_model_state_dict(model)


def ours_with(path, adapter, targets=ssd.LORA_TARGETS, **lora):
    """Our model at `path` with LoRA on `targets`, its A and B copied from a PEFT adapter state dict."""
    model, _ = ssd.load_model(str(path), "cpu", torch.float32)
    ssd.apply_lora(model, ssd.Config(**{**LORA, **lora}, lora_target_modules=",".join(targets)))
    named = dict(model.named_parameters())
    lora_names = {n for n in named if ".lora_" in n}
    assert lora_names == {k.removeprefix("base_model.model.").removesuffix(".weight") for k in adapter}
    with torch.no_grad():
        for key, value in adapter.items():
            named[key.removeprefix("base_model.model.").removesuffix(".weight")].copy_(value)
    return model.eval()


def logits_of(model, ids):
    with torch.no_grad():
        if isinstance(model, ssd.Transformer):
            return model(ids, torch.arange(ids.shape[1])[None])
        return model(ids).logits


IDS = torch.randint(0, 2045, (1, 24), generator=torch.Generator().manual_seed(5))


# ---------------------------------------------------------------- the module against PEFT -----------------------------

@pytest.mark.parametrize("family, targets", [
    ("qwen3", ssd.LORA_TARGETS),
    ("qwen2", ssd.LORA_TARGETS),  # biases on q, k, v: the base keeps them, the adapter has none
    ("llama", ("q_proj", "v_proj", "down_proj")),
    ("qwen3_moe", ("q_proj", "k_proj", "v_proj", "o_proj")),  # attention only: the experts are refused (below)
])
def test_logits_match_peft(family, targets, tmp_path):
    path, _ = make_hf_model(family, tmp_path)
    reference, adapter = peft_lora(path, targets)
    ours = ours_with(path, adapter, targets)
    base = logits_of(ssd.load_model(str(path), "cpu", torch.float32)[0], IDS)
    got, want = logits_of(ours, IDS), logits_of(reference, IDS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - base).abs().max() > 0.1  # the adapters do change the logits


def test_one_step_gradients_match_peft(tiny_model_dir):
    """Our training loss (packed sequences, activation checkpointing, chunked cross-entropy) and its gradients on A
    and B equal torch autograd through transformers + peft on each sequence alone; the base gets no gradient."""
    reference, adapter = peft_lora(tiny_model_dir)
    ours = ours_with(tiny_model_dir, adapter).train()
    ours.checkpointing = True
    seqs = tiny_seqs(seed=2, n=3)
    inputs, positions, targets, docs = ssd.pack(seqs, "cpu")
    loss = ours(inputs, positions, docs, targets=targets)
    loss.backward()
    ref = sum(F.cross_entropy(reference(torch.tensor([ids])).logits[0, n_prompt - 1:-1], torch.tensor(ids[n_prompt:]),
                              reduction="sum") for ids, n_prompt in seqs)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    named = dict(ours.named_parameters())
    for name, p in reference.named_parameters():
        if "lora_" in name:
            ours_name = name.removeprefix("base_model.model.").replace(".default.weight", "")
            torch.testing.assert_close(named[ours_name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.grad is None for n, p in named.items() if ".lora_" not in n)


def test_dropout_only_in_training_and_only_on_the_adapter(tiny_model_dir):
    _, adapter = peft_lora(tiny_model_dir)
    model = ours_with(tiny_model_dir, adapter, lora_dropout=0.5)
    plain = ours_with(tiny_model_dir, adapter, lora_dropout=0.0)
    torch.testing.assert_close(logits_of(model, IDS), logits_of(plain, IDS), rtol=0, atol=0)  # eval: no dropout
    model.train()
    first, second = logits_of(model, IDS), logits_of(model, IDS)
    assert (first - second).abs().max() > 1e-3  # training: random masks
    for m in model.modules():  # with B = 0 the adapter adds nothing: dropout never touches the base path
        if isinstance(m, ssd.LoRALinear):
            m.lora_B.data.zero_()
    base = ssd.load_model(str(tiny_model_dir), "cpu", torch.float32)[0]
    torch.testing.assert_close(logits_of(model, IDS), logits_of(base, IDS), rtol=0, atol=0)


def test_init_is_peft_start_and_independent_of_shards(tiny_model_dir):
    """A Kaiming-uniform (bound 1 / sqrt(in_features)), B zero: the model starts as the base model."""
    model, _ = ssd.load_model(str(tiny_model_dir), "cpu", torch.float32)
    ssd.apply_lora(model, ssd.Config(lora_r=8))
    ssd.init_lora_(model, seed=3)
    lora = [m for m in model.modules() if isinstance(m, ssd.LoRALinear)]
    assert len(lora) == 2 * 7
    for m in lora:
        bound = 1 / math.sqrt(m.lora_A.shape[1])
        assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.9 * bound and m.lora_A.std() > bound / 2
        assert not m.lora_B.any()
    first = [m.lora_A.clone() for m in lora]
    ssd.init_lora_(model, seed=3)
    assert all(torch.equal(a, m.lora_A) for a, m in zip(first, lora))
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())


@pytest.mark.parametrize("flags, message", [
    (dict(model_name_or_path=str(REPO / "tests/assets/tiny-qwen3-moe"), lora_r=8), "MoE experts"),
    (dict(lora_r=8, lora_target_modules="q_proj,qkv"), "unknown module 'qkv'"),
    (dict(merge_lora=True), "--lora_r > 0"),
    (dict(lora_r=8, lora_dropout=1.0), "--lora_dropout in"),
])
def test_refused_before_anything_runs(flags, message, tiny_model_dir):
    cfg = ssd.Config(**{"model_name_or_path": str(tiny_model_dir), **flags})
    with pytest.raises(ssd.SSDError, match=message) as err:
        ssd.check_config(cfg)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- whole runs: output, merge, resume -------------------

def lora_argv(tiny_model_dir, prompts_path, out, records, **flags) -> list:
    """A LoRA training command on pre-made samples in `out` (see test_train.prepare_run)."""
    return prepare_run(out, base_argv(tiny_model_dir, prompts_path, **{**LORA, "learning_rate": 1e-2, **flags}),
                       records)


def test_adapter_loads_in_peft_and_merged_output_equals_it(tiny_model_dir, prompts_path, tmp_path):
    from transformers import AutoModelForCausalLM
    records, flags = make_records(8), dict(max_steps=16, per_device_train_batch_size=4, warmup_steps=2)
    ssd.main(lora_argv(tiny_model_dir, prompts_path, tmp_path / "adapter", records, **flags))
    ssd.main(lora_argv(tiny_model_dir, prompts_path, tmp_path / "merged", records, merge_lora=True, **flags))
    out = tmp_path / "adapter"
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    assert (out / "tokenizer.json").is_file() and not (out / "train_state").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert sorted(config["target_modules"]) == sorted(ssd.LORA_TARGETS)
    losses = [m["loss"] for m in metrics(out)]
    assert len(losses) == 16 and sum(losses[-4:]) < 0.7 * sum(losses[:4]), losses  # it learns

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    assert any(p.abs().max() > 0 for n, p in loaded.named_parameters() if "lora_B" in n)  # it trained
    want = logits_of(loaded, IDS)
    assert (want - logits_of(ssd.load_model(str(tiny_model_dir), "cpu", torch.float32)[0], IDS)).abs().max() > 0.01
    torch.testing.assert_close(logits_of(ssd.load_model(str(out), "cpu", torch.float32)[0], IDS), want,
                               rtol=1e-4, atol=1e-4)  # load_model (and so eval.py) takes an adapter directory

    # --merge_lora: a full checkpoint, base + scale * B @ A, everything else the base's own (frozen) weights
    merged_dir = tmp_path / "merged"
    assert (merged_dir / "config.json").is_file() and not (merged_dir / "adapter_config.json").exists()
    merged, base_w, adapter = weights(merged_dir), weights(tiny_model_dir), load_file(out / "adapter_model.safetensors")
    for key in base_w:
        a = adapter.get(f"base_model.model.{key.removesuffix('.weight')}.lora_A.weight")
        if a is None:
            assert torch.equal(merged[key], base_w[key]), key
        else:
            b = adapter[f"base_model.model.{key.removesuffix('.weight')}.lora_B.weight"]
            torch.testing.assert_close(merged[key], base_w[key] + 2.0 * b @ a, rtol=0, atol=1e-6)
    hf_merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    torch.testing.assert_close(logits_of(hf_merged, IDS), want, rtol=1e-4, atol=1e-4)


def test_kill_and_resume_is_bit_identical(tiny_model_dir, prompts_path, tmp_path, monkeypatch):
    """Killed right after its step-2 state (dropout on, checkpointing on): the rerun resumes from a state that holds
    only the adapters and their AdamW moments, and ends with the very adapter of an uninterrupted run."""
    records, flags = make_records(16), dict(max_steps=6, save_steps=2, lora_dropout=0.1, gradient_checkpointing=True)
    ssd.main(lora_argv(tiny_model_dir, prompts_path, tmp_path / "reference", records, **flags))
    killed = lora_argv(tiny_model_dir, prompts_path, tmp_path / "killed", records, **flags)
    original_save, states = ssd.save_state, []

    def save_then_die(path, state, rank):
        original_save(path, state, rank)
        states.append(state)
        raise RuntimeError("killed")

    monkeypatch.setattr(ssd, "save_state", save_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        ssd.main(killed)
    model, _ = ssd.load_model(str(tiny_model_dir), "cpu", torch.float32)
    lora_shapes = [p.shape for n, p in ssd.apply_lora(model, ssd.Config(**LORA)).named_parameters() if p.requires_grad]
    assert [p.shape for p in states[0]["params"]] == lora_shapes  # no base weight in the state
    assert [p.shape for p in states[0]["exp_avg"]] == lora_shapes
    monkeypatch.setattr(ssd, "save_state", original_save)
    ssd.main(killed)
    got = load_file(tmp_path / "killed" / "adapter_model.safetensors")
    want = load_file(tmp_path / "reference" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert [m["loss"] for m in metrics(tmp_path / "killed")] == [m["loss"] for m in metrics(tmp_path / "reference")]


def test_rounds_merge_before_sampling(tiny_model_dir, prompts_path, tmp_path):
    """Round 1 writes its merged model (round 2 samples from it); the last round's adapter is on that model."""
    out = tmp_path / "run"
    argv = base_argv(tiny_model_dir, prompts_path, rounds=2, max_prompts=4, max_completion_length=16, max_steps=2,
                     temperature=1.0, learning_rate=1e-2, **LORA) + [f"--output_dir={out}"]
    ssd.main(argv)
    assert (out / "round-1" / "config.json").is_file() and not (out / "round-1" / "adapter_config.json").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str((out / "round-1").resolve())
    assert any(not torch.equal(weights(out / "round-1")[k], v) for k, v in weights(tiny_model_dir).items())
    ssd.main(argv)  # a rerun finds both rounds done


@pytest.mark.slow
def test_fsdp_two_ranks_match_one(tiny_model_dir, prompts_path, tmp_path):
    """2 gloo ranks, each holding half of every frozen weight and adapter, against 1 rank: the same adapter."""
    records, common = make_records(24), dict(**LORA, max_steps=3, gradient_accumulation_steps=2, learning_rate=1e-2)
    one = prepare_run(tmp_path / "one", base_argv(tiny_model_dir, prompts_path, per_device_train_batch_size=2,
                                                  **common), records)
    two = prepare_run(tmp_path / "two", base_argv(tiny_model_dir, prompts_path, per_device_train_batch_size=1,
                                                  **common), records)
    ssd.main(one)
    run_cli(two, torchrun=2)
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    got = load_file(tmp_path / "two" / "adapter_model.safetensors")
    want = load_file(tmp_path / "one" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5, msg=k)


def test_cuda_layout_on_cpu(tiny_model_dir):
    """The layout --bf16 gives on CUDA, run on CPU: frozen weights stored in bf16, adapters in fp32, FSDP2 gathering
    bf16 and reducing fp32. Only the adapters get gradients (fp32), and the loss is the fp32 one to bf16 accuracy."""
    cfg = ssd.Config(**LORA, bf16=True)
    cuda = torch.device("cuda")  # apply_lora and shard_model look only at the device's type; memory stays on CPU
    ssd.init_distributed()
    try:
        model, _ = ssd.load_model(str(tiny_model_dir), "cpu", torch.float32,
                                  shard=lambda m: ssd.shard_model(ssd.apply_lora(m, cfg, cuda), cfg, cuda))
        ssd.init_lora_(model, 0)
        assert {(p.dtype, p.requires_grad) for p in model.parameters()} == {(torch.bfloat16, False),
                                                                            (torch.float32, True)}
        model.train()
        model.checkpointing = True
        inputs, positions, targets, docs = ssd.pack(tiny_seqs(seed=4, n=2), "cpu")
        loss = model(inputs, positions, docs, targets=targets)
        loss.backward()
        assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
        assert {p.grad.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
        assert any(p.grad.to_local().abs().max() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))
    finally:
        torch.distributed.destroy_process_group()
    reference, _ = ssd.load_model(str(tiny_model_dir), "cpu", torch.float32)  # B = 0: the base model's loss
    torch.testing.assert_close(loss, reference(inputs, positions, docs, targets=targets), rtol=2e-2, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_adapter_loads_in_peft(tiny_model_dir, prompts_path, tmp_path):
    """On CUDA (bf16 frozen weights, fp32 adapters, flash varlen attention): a LoRA run trains, and PEFT on the fp32
    base computes what our loader computes from the adapter directory, to bf16 accuracy."""
    from transformers import AutoModelForCausalLM
    out = tmp_path / "run"
    ssd.main(lora_argv(tiny_model_dir, prompts_path, out, make_records(8), max_steps=16, per_device_train_batch_size=4,
                       warmup_steps=2))
    losses = [m["loss"] for m in metrics(out)]
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4]), losses
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    want = logits_of(peft.PeftModel.from_pretrained(base, out).eval(), IDS)
    ours, _ = ssd.load_model(str(out), "cuda", torch.float32)
    got = logits_of(ours, IDS.cuda()).cpu()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)
