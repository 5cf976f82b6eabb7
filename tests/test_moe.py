"""Qwen3-MoE (model_type qwen3_moe, the paper's headline Qwen3-30B-A3B): our MoE block against transformers'
Qwen3MoeForCausalLM, the per-expert checkpoint layout in and out, sampling through the engine, and training."""

import json

import pytest
import torch
from helpers import ENDOFTEXT_ID, IM_END_ID, make_hf_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import ssd

ASSET = "tests/assets/tiny-qwen3-moe"
CASES = {  # name -> config overrides on helpers' qwen3_moe defaults (8 experts, top-2, renormalised)
    "default": {},
    "unnormalised-top1": dict(norm_topk_prob=False, num_experts_per_tok=1),
    "top4-gqa4": dict(num_experts_per_tok=4, num_key_value_heads=1),
    "dense-layer-between": dict(num_hidden_layers=3, mlp_only_layers=[1]),
    "sparse-every-2nd-tied": dict(num_hidden_layers=4, decoder_sparse_step=2, tie_word_embeddings=True),
}


def logits_pair(model, hf, ids):
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).expand(len(ids), -1)), hf(ids).logits


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, tmp_path):
    path, hf = make_hf_model("qwen3_moe", tmp_path, seed=len(case), **CASES[case])
    model, _ = ssd.load_model(str(path), "cpu", torch.float32)
    cfg = model.config
    sparse = [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]
    assert cfg.moe_layers == sparse and all(isinstance(model.model.layers[i].mlp, ssd.MoE) for i in sparse)
    ids = torch.randint(0, 2048, (2, 120), generator=torch.Generator().manual_seed(1))
    ours, theirs = logits_pair(model, hf, ids)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_router_picks_transformers_experts_and_weights(tmp_path):
    path, hf = make_hf_model("qwen3_moe", tmp_path)
    model, _ = ssd.load_model(str(path), "cpu", torch.float32)
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    _, hf_weights, hf_experts = hf.model.layers[0].mlp.gate(x)
    probs = model.model.layers[0].mlp.gate(x).float().softmax(-1)
    weights, experts = probs.topk(2, dim=-1)
    assert torch.equal(experts, hf_experts)
    torch.testing.assert_close(weights / weights.sum(-1, keepdim=True), hf_weights, rtol=1e-6, atol=1e-7)
    moe = model.model.layers[0].mlp
    torch.testing.assert_close(moe(x[None])[0], hf.model.layers[0].mlp(x[None])[0], rtol=1e-5, atol=1e-6)


def test_checkpoint_in_and_out(tmp_path):
    """Experts are stacked in memory and stored one by one on disk, as transformers writes and reads them."""
    model, tokenizer = ssd.load_model(ASSET, "cpu", torch.float32)
    assert model.model.layers[0].mlp.gate_up_proj.shape == (8, 64, 64)  # (experts, gate + up rows, hidden)
    ssd.save_model(model, tokenizer, tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as new, safe_open(f"{ASSET}/model.safetensors",
                                                                                  "pt") as old:
        assert sorted(new.keys()) == sorted(old.keys())
        assert "model.layers.1.mlp.experts.7.up_proj.weight" in new.keys()
        for key in old.keys():
            assert torch.equal(new.get_tensor(key), old.get_tensor(key)), key
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 2048, (1, 50), generator=torch.Generator().manual_seed(3))
    ours, theirs = logits_pair(model, hf, ids)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_config_reads_both_expert_count_keys(tmp_path):
    """transformers 5 writes num_local_experts; the hub's Qwen3-30B-A3B config.json has num_experts."""
    hf = json.loads(open(f"{ASSET}/config.json").read())
    assert ssd.model_config_from_hf(hf).num_experts == 8
    hf["num_experts"] = hf.pop("num_local_experts", 8)
    assert ssd.model_config_from_hf(hf).num_experts == 8


def test_missing_expert_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    path, _ = make_hf_model("qwen3_moe", tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.gate_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ssd.SSDError, match="missing 1 tensors, e.g. model.layers.1.mlp.experts.3.gate_proj.weight"):
        ssd.load_model(str(path), "cpu", torch.float32)


def test_greedy_sampling_matches_transformers():
    model, tok = ssd.load_model(ASSET, "cpu", torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(ASSET).eval()
    rows = [json.loads(line) for line in open("tests/assets/prompts.jsonl")][:4]
    prompts = [tok(tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False).input_ids for r in rows]
    out = ssd.generate(model, prompts, max_new_tokens=24, greedy=True, batch_size=3, progress=False)
    for p, (c,) in zip(prompts, out):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False,
                          eos_token_id=[IM_END_ID, ENDOFTEXT_ID], pad_token_id=ENDOFTEXT_ID)[0, len(p):].tolist()
        assert c.tokens == ref


def test_training_step_moves_router_and_experts():
    """Plain cross-entropy (no auxiliary load-balancing loss, as the paper trains): the router and every expert
    that saw a token get gradients, the same experts in both stacks."""
    model, _ = ssd.load_model(ASSET, "cpu", torch.float32)
    ids = torch.randint(0, 2045, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    inputs, positions, targets, docs = ssd.pack([(ids, 10)], "cpu")
    model(inputs, positions, docs, targets=targets).backward()
    moe = model.model.layers[0].mlp
    assert moe.gate.weight.grad.abs().sum() > 0
    used = moe.gate_up_proj.grad.flatten(1).abs().sum(1) > 0
    assert used.sum() >= 2 and torch.equal(used, moe.down_proj.grad.flatten(1).abs().sum(1) > 0)


def test_grouped_matmul_path_equals_the_expert_loop():
    """The CUDA bf16 path (F.grouped_mm over groups padded to 16 rows, which torch also runs on CPU) against the
    per-expert loop: the same outputs and gradients in fp32, with experts that receive no token at all."""
    from types import SimpleNamespace
    cfg = SimpleNamespace(hidden_size=32, num_experts=16, experts_per_token=4, moe_intermediate_size=24,
                          norm_topk_prob=True)
    torch.manual_seed(0)
    moe = ssd.MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 32)
    experts = moe.gate(x).topk(4, dim=-1).indices.flatten()
    order = experts.argsort(stable=True)
    tokens, chosen = order // 4, experts[order]
    counts = torch.bincount(chosen, minlength=16)
    assert (counts == 0).any() and (counts > 1).any()
    ends = counts.cumsum(0).tolist()
    outputs, grads = [], []
    for run in ("grouped", "loop"):
        moe.zero_grad()
        if run == "grouped":
            y = moe.grouped_experts(x[tokens], chosen, counts)
        else:
            y = torch.cat([moe.expert(x[tokens[a:b]], e) for e, (a, b) in enumerate(zip([0] + ends, ends)) if b > a])
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outputs.append(y.detach())
        grads.append([moe.gate_up_proj.grad.clone(), moe.down_proj.grad.clone()])
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    for g, ref in zip(*grads):
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-5)
