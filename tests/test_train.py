"""Training phase: the hand-written AdamW and schedule, the data plan, the loss, and whole CLI runs on pre-made
samples (so no test here samples: they need neither the sampling kernels nor a generation pass)."""

import dataclasses
import functools
import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import ssd

REPO = Path(__file__).resolve().parent.parent
END_ID = 2047  # <|im_end|> of the tiny tokenizer


# ---------------------------------------------------------------- helpers ---------------------------------------------

def base_argv(tiny_model_dir, prompts_path, **flags) -> list:
    """A training command on pre-made samples; flags override the small defaults below."""
    settings = dict(model_name_or_path=tiny_model_dir, dataset_path=prompts_path, prompt_column="prompt",
                    max_completion_length=32, max_steps=4, per_device_train_batch_size=2,
                    gradient_accumulation_steps=1, learning_rate=1e-3, warmup_steps=1, save_steps=100)
    settings.update(flags)
    return [(f"--{k}" if v else f"--no-{k}") if isinstance(v, bool) else f"--{k}={v}" for k, v in settings.items()]


@functools.cache
def tokenized_assets() -> tuple:
    """(tokenizer, the corpus's token ids, the prompt strings) of tests/assets."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(REPO / "tests" / "assets" / "tiny-qwen3")
    corpus = tok((REPO / "tests" / "assets" / "corpus.txt").read_text(), verbose=False).input_ids
    prompts = [json.loads(line)["prompt"] for line in (REPO / "tests" / "assets" / "prompts.jsonl").open()]
    return tok, corpus, prompts


def make_records(n: int, seed: int = 0) -> list:
    """n samples.jsonl records: a tokenized prompt and a completion cut from the corpus of Python solutions and
    prose (learnable text, varied lengths), every other one ending in the end token as a finished sample does."""
    tok, corpus, prompts = tokenized_assets()
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(n):
        prompt_ids = tok(prompts[i % len(prompts)]).input_ids
        length = int(torch.randint(8, 32, (), generator=g))
        start = int(torch.randint(0, len(corpus) - length, (), generator=g))
        completion = corpus[start:start + length]
        stop = "eos" if i % 2 == 0 else "length"
        if stop == "eos":
            completion = completion[:-1] + [END_ID]
        records.append({
            "prompt_index": i, "sample_index": 0, "prompt": tok.decode(prompt_ids),
            "completion": tok.decode(completion, skip_special_tokens=True), "prompt_ids": prompt_ids,
            "completion_ids": completion, "prompt_tokens": len(prompt_ids), "completion_tokens": len(completion),
            "stop": stop, "prompt_cut": False, "keep": True, "drop_reason": None})
    return records


def prepare_run(out: Path, argv: list, records: list) -> list:
    """Make `out` look like a run whose data phase finished: its ssd_config.json and samples.jsonl.
    Returns the full command (argv + --output_dir)."""
    argv = argv + [f"--output_dir={out}"]
    out.mkdir(parents=True)
    (out / "ssd_config.json").write_text(json.dumps(dataclasses.asdict(ssd.parse_args(argv)), indent=2))
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return argv


def weights(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


def metrics(path: Path) -> list:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def assert_weights_close(got: dict, ref: dict, atol: float = 1e-4):
    """Tight, for weights that took the same updates up to float rounding. Adam divides by sqrt(v), so an element
    whose gradient is mostly rounding noise can move by a visible fraction of lr (1e-5 seen at lr 1e-3): allow atol
    on a few elements, and require all but 1 in 10,000 to agree to 1e-6. A real difference in the update (a missing
    rank, a wrong scale) moves most elements by ~lr."""
    assert got.keys() == ref.keys()
    worst, off, total = 0.0, 0, 0
    for name in ref:
        diff = (got[name] - ref[name]).abs()
        worst = max(worst, diff.max().item())
        off += int((diff > 1e-6).sum())
        total += diff.numel()
    assert worst <= atol and off <= total // 10_000, (worst, off, total)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_seqs(tokenizer_len=2045, seed=0, n=2):
    """n (token ids, prompt length) sequences of different lengths, every other one ending in the end token."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(6, 40, (n,), generator=g).tolist()
    return [(torch.randint(0, tokenizer_len, (length,), generator=g).tolist() + [END_ID] * (k % 2),
             int(torch.randint(1, length - 2, (), generator=g))) for k, length in enumerate(lengths)]


def tiny_batch(tokenizer_len=2045, seed=0):
    """Two sequences of different lengths packed into one row by ssd.pack: ids, positions, targets, documents."""
    return ssd.pack(tiny_seqs(tokenizer_len, seed), "cpu")


# ---------------------------------------------------------------- optimizer and schedule ------------------------------

def test_adamw_step_matches_torch_adamw():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.Linear(32, 32),
                              torch.nn.Linear(32, 5, bias=False))
    ours = [p.detach().clone() for p in net.parameters()]
    cfg = ssd.Config(weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8)
    groups = [{"params": [p for p in net.parameters() if p.ndim >= 2]},  # the usual no-decay group: biases (1-D)
              {"params": [p for p in net.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1.0, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                            weight_decay=cfg.weight_decay, foreach=False)
    exp_avg = [torch.zeros_like(p) for p in ours]
    exp_avg_sq = [torch.zeros_like(p) for p in ours]
    g = torch.Generator().manual_seed(1)
    for step in range(1, 101):
        lr = ssd.lr_at(step - 1, 100, dataclasses.replace(cfg, learning_rate=3e-3, warmup_steps=10))
        # Gradients of a real loss at torch's parameters (so they follow the trajectory), used by both updates.
        net.zero_grad()
        x = torch.randn(16, 12, generator=g)
        net(x).pow(2).mean().backward()
        grads = [p.grad.clone() for p in net.parameters()]
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        ssd.adamw_step(ours, grads, exp_avg, exp_avg_sq, step, lr, cfg)
    for p, q, m, v in zip(net.parameters(), ours, exp_avg, exp_avg_sq):
        torch.testing.assert_close(q, p.detach(), rtol=0, atol=1e-7)
        torch.testing.assert_close(m, opt.state[p]["exp_avg"], rtol=0, atol=1e-7)
        torch.testing.assert_close(v, opt.state[p]["exp_avg_sq"], rtol=0, atol=1e-9)


def test_weight_decay_spares_norms_and_biases(tiny_model_dir, tmp_path):
    """With a zero gradient, AdamW moves a parameter only through weight decay: every matrix of a real model (qkv
    biases included, from Qwen2) shrinks by 1 - lr * wd, and no norm scale or bias changes at all."""
    from helpers import make_hf_model
    path, _ = make_hf_model("qwen2", tmp_path)
    model, _ = ssd.load_model(str(path), "cpu", torch.float32)
    named = dict(model.named_parameters())
    before = {k: p.detach().clone() for k, p in named.items()}
    params = list(named.values())
    zeros = [torch.zeros_like(p) for p in params]
    cfg = ssd.Config()
    assert cfg.weight_decay == 0.1
    ssd.adamw_step([p.data for p in params], zeros, [torch.zeros_like(p) for p in params],
                   [torch.zeros_like(p) for p in params], 1, 1e-2, cfg)
    spared = [k for k in named if "norm" in k or k.endswith(".bias")]
    assert any(k.endswith("q_proj.bias") for k in spared) and any("layernorm" in k for k in spared)
    for k, p in named.items():
        expected = before[k] if k in spared else before[k] * (1 - 1e-2 * 0.1)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=0, msg=k)


def test_paper_recipe_defaults():
    """The authors' recipe (apple/ml-ssd issue #7): betas (0.9, 0.95), wd 0.1, cosine 5e-6 -> 1e-6, 2,500 steps with
    250 warmup, global batch 32 on 8 GPUs."""
    cfg = ssd.Config()
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.weight_decay) == (0.9, 0.95, 0.1)
    assert (cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio) == pytest.approx((5e-6, 1e-6))
    assert cfg.max_steps == 2500 and math.ceil(cfg.warmup_ratio * cfg.max_steps) == 250
    assert cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * 8 == 32
    assert ssd.lr_at(2499, 2500, cfg) == pytest.approx(1e-6, rel=1e-4)


def test_lr_schedule():
    cfg = ssd.Config(learning_rate=1e-3, warmup_ratio=0.1, warmup_steps=0, min_lr_ratio=0.0)
    total = 100  # warmup = 10 steps
    assert ssd.lr_at(0, total, cfg) == pytest.approx(1e-4)  # the first step already learns
    assert ssd.lr_at(4, total, cfg) == pytest.approx(5e-4)
    assert ssd.lr_at(9, total, cfg) == pytest.approx(1e-3)  # warmup ends at the peak
    assert ssd.lr_at(10, total, cfg) == pytest.approx(1e-3)  # the cosine starts at the peak
    assert ssd.lr_at(55, total, cfg) == pytest.approx(5e-4)  # midpoint of the 90 cosine steps
    assert 0 < ssd.lr_at(99, total, cfg) < 1e-6  # last step: almost at the floor
    lrs = [ssd.lr_at(s, total, cfg) for s in range(10, total)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))

    floor = dataclasses.replace(cfg, min_lr_ratio=0.1)
    assert ssd.lr_at(55, total, floor) == pytest.approx((1e-3 + 1e-4) / 2)
    assert ssd.lr_at(99, total, floor) == pytest.approx(1e-4, rel=1e-2)  # (1 - cos(pi / 90)) / 2 above
    assert min(ssd.lr_at(s, total, floor) for s in range(total)) >= 1e-4

    steps = dataclasses.replace(cfg, warmup_steps=4)  # overrides warmup_ratio
    assert [ssd.lr_at(s, total, steps) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert ssd.lr_at(4 + 48, total, steps) == pytest.approx(5e-4)

    none = dataclasses.replace(cfg, warmup_ratio=0.0)
    assert ssd.lr_at(0, total, none) == pytest.approx(1e-3)
    assert ssd.lr_at(50, total, none) == pytest.approx(5e-4)


# ---------------------------------------------------------------- data plan and batches -------------------------------

@pytest.mark.parametrize("world", [1, 2, 3])
def test_step_microbatches_plan(world):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 200, (48,), generator=g).tolist()  # 48: a whole number of steps per epoch
    lengths[7] = 5000  # longer than the token budget on its own
    cfg = ssd.Config(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_tokens_per_microbatch=600,
                     seed=3)
    size = 4 * 2 * world
    per_epoch = len(lengths) // size
    plans = [ssd.step_microbatches(lengths, s, cfg, world) for s in range(3 * per_epoch)]
    assert plans == [ssd.step_microbatches(lengths, s, cfg, world) for s in range(3 * per_epoch)]  # deterministic

    steps = []
    for plan in plans:
        assert len(plan) == world
        for micro in plan:
            assert sum(map(len, micro)) == size // world  # every rank gets an equal share
            # first-fit decreasing: no sequence could have gone into an earlier micro-batch
            room = [cfg.max_tokens_per_microbatch - sum(lengths[i] for i in mb) for mb in micro]
            assert all(lengths[mb[0]] > max(room[:m], default=0) for m, mb in enumerate(micro) if m)
            for mb in micro:
                if len(mb) > 1:  # packed tokens within the budget
                    assert sum(lengths[i] for i in mb) <= cfg.max_tokens_per_microbatch
                if 7 in mb:
                    assert mb == [7]  # over the budget alone: a micro-batch of its own
        steps.append(sorted(i for micro in plan for mb in micro for i in mb))
        assert len(set(steps[-1])) == size  # the step's global batch: every sequence once across the ranks

    # Each epoch's steps cover every sequence exactly once, and each epoch deals them in a new order.
    epochs = [steps[e * per_epoch:(e + 1) * per_epoch] for e in range(3)]
    for epoch in epochs:
        assert sorted(sum(epoch, [])) == list(range(len(lengths)))
    assert epochs[0] != epochs[1] != epochs[2]
    other_seed = [sorted(i for micro in ssd.step_microbatches(lengths, s, dataclasses.replace(cfg, seed=4), world)
                         for mb in micro for i in mb) for s in range(per_epoch)]
    assert other_seed != epochs[0]


def test_step_microbatches_epochs_are_new_permutations():
    lengths = [10] * 12  # equal lengths: the plan keeps the permutation's order up to the length sort's tie-break
    cfg = ssd.Config(per_device_train_batch_size=3, gradient_accumulation_steps=1, seed=0)
    order = [[i for micro in ssd.step_microbatches(lengths, s, cfg, 1) for mb in micro for i in mb]
             for s in range(8)]  # 4 steps per epoch, 2 epochs
    epochs = [sum(order[:4], []), sum(order[4:], [])]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12))
    assert [set(s) for s in order[:4]] != [set(s) for s in order[4:]]


def test_pack_lays_sequences_end_to_end():
    prompt, completion = [5, 6, 7, 8], [9, 10, END_ID]
    short = ([1, 2, 3], 2)
    inputs, positions, targets, docs = ssd.pack([(prompt + completion, len(prompt)), short], "cpu")
    assert inputs.tolist() == [[5, 6, 7, 8, 9, 10, END_ID, 1, 2, 3]]
    assert positions.tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2]]  # every sequence starts at position 0
    # position t predicts token t + 1 of its own sequence: the last prompt position predicts the first completion
    # token, the end token is a target (it teaches the model to stop), and no target crosses into the next sequence.
    assert targets.tolist() == [[-100, -100, -100, 9, 10, END_ID, -100, -100, 3, -100]]
    assert docs.cu_lens.tolist() == [0, 7, 10] and docs.lens == [7, 3]


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_packed_loss_and_gradients_equal_unpacked(family, tmp_path):
    """Six sequences packed into one row: each one's loss, and the gradient of that loss, equal what the sequence
    gives alone (fp32, CPU), in the units training uses (a token mean over the sequence's targets): losses to 1e-6,
    gradients to 2e-6 per element (seen: 1.2e-6 at worst, on 1 of 131,072 elements; fp32 sums over other lengths).
    Nothing attends across the documents and positions restart; without the mask the losses move."""
    from helpers import make_hf_model
    path, _ = make_hf_model(family, tmp_path)
    model, _ = ssd.load_model(str(path), "cpu", torch.float32)
    seqs = tiny_seqs(seed=3, n=6)
    params = list(model.parameters())
    inputs, positions, targets, docs = ssd.pack(seqs, "cpu")
    logits = model(inputs, positions, docs)[0].float()
    unmasked = model(inputs, positions)[0].float()
    start, moved = 0, 0.0
    for ids, n_prompt in seqs:
        one = ssd.pack([(ids, n_prompt)], "cpu")
        alone = model(*one[:2], one[3], targets=one[2]) / (len(ids) - n_prompt)
        rows = slice(start + n_prompt - 1, start + len(ids) - 1)
        packed = F.cross_entropy(logits[rows], targets[0, rows])
        torch.testing.assert_close(packed, alone, rtol=1e-6, atol=1e-6)
        for a, b in zip(torch.autograd.grad(alone, params), torch.autograd.grad(packed, params, retain_graph=True)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-6)
        moved = max(moved, abs(F.cross_entropy(unmasked[rows], targets[0, rows]).item() - alone.item()))
        start += len(ids)
    assert moved > 1e-2  # the mask matters: later sequences would otherwise see the earlier ones
    total = model(inputs, positions, docs, targets=targets)  # the summed loss training uses
    torch.testing.assert_close(total, F.cross_entropy(logits, targets[0], reduction="sum"), rtol=1e-6, atol=1e-4)


# ---------------------------------------------------------------- the loss --------------------------------------------

def test_chunked_cross_entropy_matches_full_logits(tiny_model_dir, monkeypatch):
    model, _ = ssd.load_model(str(tiny_model_dir), "cpu", torch.float32)
    inputs, positions, targets, docs = tiny_batch()
    n_scored = int((targets != -100).sum())
    monkeypatch.setattr(ssd, "CE_CHUNK", 5)  # several chunks and a short last one
    assert n_scored > 3 * ssd.CE_CHUNK and n_scored % ssd.CE_CHUNK

    loss = model(inputs, positions, docs, targets=targets)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    logits = model(inputs, positions, docs).float()
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_activation_checkpointing_changes_no_gradient(tiny_model_dir):
    model, _ = ssd.load_model(str(tiny_model_dir), "cpu", torch.float32)
    model.train()
    inputs, positions, targets, docs = tiny_batch(seed=1)
    results = []
    for checkpointing in (False, True):
        model.checkpointing = checkpointing
        model.zero_grad()
        loss = model(inputs, positions, docs, targets=targets)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    for g1, g0 in zip(grads1, grads0):
        torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- whole training runs (CLI in process) ----------------

def test_gradient_accumulation_equals_bigger_batch(tiny_model_dir, prompts_path, tmp_path):
    records = make_records(16)
    finals = []
    for per_device, accumulation in ((1, 4), (4, 1)):
        out = tmp_path / f"{per_device}x{accumulation}"
        argv = prepare_run(out, base_argv(tiny_model_dir, prompts_path, per_device_train_batch_size=per_device,
                                          gradient_accumulation_steps=accumulation, max_steps=3), records)
        ssd.main(argv)
        finals.append((weights(out), metrics(out)))
    (w_acc, m_acc), (w_big, m_big) = finals
    assert [m["step"] for m in m_acc] == [1, 2, 3]
    for a, b in zip(m_acc, m_big):
        assert a["tokens"] == b["tokens"] and a["completion_tokens"] == b["completion_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert_weights_close(w_acc, w_big)
    base = weights(tiny_model_dir)
    assert any(not torch.equal(w_acc[k], base[k]) for k in base)  # it did train


def test_loss_falls_and_saved_model_loads_in_transformers(tiny_model_dir, prompts_path, tmp_path):
    out = tmp_path / "run"
    argv = prepare_run(out, base_argv(tiny_model_dir, prompts_path, max_steps=30, per_device_train_batch_size=4,
                                      learning_rate=1e-3, warmup_steps=3), make_records(8))
    ssd.main(argv)
    losses = [m["loss"] for m in metrics(out)]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, losses  # about 0.3 in practice
    assert not (out / "train_state").exists()

    # The saved checkpoint is a Hugging Face one: transformers computes the same logits as our loader.
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours, _ = ssd.load_model(str(out), "cpu", torch.float32)
    ids = torch.tensor([make_records(1)[0]["prompt_ids"]])
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids, torch.arange(ids.shape[1])[None])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [END_ID, 2045]


def test_nan_loss_stops_and_keeps_last_good_state(tiny_model_dir, prompts_path, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = prepare_run(out, base_argv(tiny_model_dir, prompts_path, max_steps=8, save_steps=2), make_records(8))
    calls, saved = [0], []
    original_ce, original_save = ssd.chunked_cross_entropy, ssd.save_state

    def nan_from_step_4(h, weight, targets):  # one micro-batch a step: call k is step k + 1
        calls[0] += 1
        loss = original_ce(h, weight, targets)
        return loss * float("nan") if calls[0] >= 4 else loss

    def recording_save(path, state, rank):
        original_save(path, state, rank)
        saved.append(hashlib.sha256((path / "rank0.pt").read_bytes()).hexdigest())

    monkeypatch.setattr(ssd, "chunked_cross_entropy", nan_from_step_4)
    monkeypatch.setattr(ssd, "save_state", recording_save)
    with pytest.raises(ssd.SSDError, match=r"\bstep 4\b") as err:
        ssd.run(ssd.parse_args(argv))
    assert "\n" not in str(err.value)
    assert len(saved) == 1  # the state of step 2, and nothing after it
    state_file = out / "train_state" / "rank0.pt"
    assert hashlib.sha256(state_file.read_bytes()).hexdigest() == saved[0]
    assert torch.load(state_file, weights_only=True)["step"] == 2
    assert not (out / "config.json").exists()  # no model was saved from the broken run
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    assert not torch.distributed.is_initialized()


def test_nan_gradient_stops_before_the_update(tiny_model_dir, prompts_path, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = prepare_run(out, base_argv(tiny_model_dir, prompts_path, max_steps=4, save_steps=2), make_records(8))
    calls, original_ce = [0], ssd.chunked_cross_entropy

    def nan_gradient_at_step_2(h, weight, targets):  # + sqrt(0) adds 0 to the loss and 0 * inf = NaN to the gradient
        calls[0] += 1
        loss = original_ce(h, weight, targets)
        return loss + (h.sum() * 0).sqrt() if calls[0] == 2 else loss

    monkeypatch.setattr(ssd, "chunked_cross_entropy", nan_gradient_at_step_2)
    with pytest.raises(ssd.SSDError, match=r"\bstep 2\b"):
        ssd.run(ssd.parse_args(argv))
    assert not (out / "train_state").exists()  # nothing saved from the poisoned weights


# ---------------------------------------------------------------- rounds ----------------------------------------------

def test_two_rounds_and_rerun_skips_them(tiny_model_dir, prompts_path, tmp_path, monkeypatch, capsys):
    """Round 1 samples from and trains the base model in round-1/; round 2 samples from and trains the round-1
    model into output_dir. Samples are made by the real sampler (kernels), at a tiny size."""
    out = tmp_path / "run"
    argv = base_argv(tiny_model_dir, prompts_path, rounds=2, max_prompts=4, num_samples=2, max_completion_length=16,
                     max_steps=2, learning_rate=1e-2, temperature=1.0) + [f"--output_dir={out}"]
    loaded = []
    original_load = ssd.load_model

    def recording_load(name_or_path, *args, **kwargs):
        loaded.append(str(name_or_path))
        return original_load(name_or_path, *args, **kwargs)

    monkeypatch.setattr(ssd, "load_model", recording_load)
    ssd.main(argv)
    round1 = out / "round-1"
    # sample round 1, train round 1 (from the base model), sample round 2 and train round 2 (from round 1)
    assert loaded == [str(tiny_model_dir)] * 2 + [str(round1)] * 2
    for work in (round1, out):
        assert (work / "config.json").is_file() and (work / "model.safetensors").is_file()
        assert len((work / "samples.jsonl").read_text().splitlines()) == 8
        assert len(metrics(work)) == 2
        assert not (work / "train_state").exists()
    assert weights(round1).keys() == weights(out).keys()
    assert any(not torch.equal(weights(round1)[k], weights(out)[k]) for k in weights(out))

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    loaded.clear()
    capsys.readouterr()
    ssd.main(argv)
    printed = capsys.readouterr().out
    assert loaded == []  # nothing to redo: no model loaded
    assert "round 1: model already trained" in printed and "round 2: model already trained" in printed
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_each_round_draws_new_random_numbers(tiny_model_dir, prompts_path, tmp_path):
    """At learning rate 0 round 2 samples from the very weights of round 1: with one seed for every round it would
    replay round 1's samples token for token. Each round's seed comes from (seed, round), so they differ."""
    out = tmp_path / "run"
    ssd.main(base_argv(tiny_model_dir, prompts_path, rounds=2, max_prompts=8, max_completion_length=16, max_steps=1,
                       learning_rate=0.0, temperature=1.0) + [f"--output_dir={out}"])
    base, trained = weights(tiny_model_dir), weights(out / "round-1")
    assert all(torch.equal(base[k], trained[k]) for k in base)  # round 2 sampled from the base model's weights

    def samples(work):
        return [json.loads(line)["completion_ids"] for line in (work / "samples.jsonl").read_text().splitlines()]
    first, second = samples(out / "round-1"), samples(out)
    assert sum(a != b for a, b in zip(first, second)) >= 6, (first, second)


# ---------------------------------------------------------------- subprocess runs -------------------------------------

def run_cli(argv, *, torchrun: int = 0, timeout: int = 180):
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
                f"--master_port={free_port()}"] if torchrun else [sys.executable]
    result = subprocess.run(launcher + ["ssd.py"] + argv, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-qwen3", "tiny-qwen3-moe"])
def test_fsdp_two_ranks_match_one(model, prompts_path, tmp_path):
    """Sharded over 2 gloo ranks (each loading only its slices) against 1 rank: the same losses and weights. For
    the MoE model, FSDP splits the stacked experts between the ranks (4 each)."""
    tiny_model_dir = REPO / "tests" / "assets" / model
    records = make_records(24)
    common = dict(max_steps=4, gradient_accumulation_steps=2, learning_rate=1e-3)
    one = prepare_run(tmp_path / "one", base_argv(tiny_model_dir, prompts_path, per_device_train_batch_size=2,
                                                  **common), records)
    two = prepare_run(tmp_path / "two", base_argv(tiny_model_dir, prompts_path, per_device_train_batch_size=1,
                                                  **common), records)
    ssd.main(one)
    run_cli(two, torchrun=2)
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in m2] == [1, 2, 3, 4]
    for a, b in zip(m1, m2):
        assert (a["tokens"], a["completion_tokens"]) == (b["tokens"], b["completion_tokens"])  # the same data
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert_weights_close(weights(tmp_path / "two"), weights(tmp_path / "one"))


LOAD_CHECK = """
import json, resource, sys
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer
import ssd
rank, world, device = ssd.init_distributed()
def resident():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
with torch.device("meta"):
    torch.nn.Embedding(2, 2)  # torch's first meta-device init loads ~150 MB of its own, whatever the model's size
AutoTokenizer.from_pretrained(sys.argv[1])  # and so does transformers' first tokenizer
before, peak_before = resident(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model, _ = ssd.load_model(sys.argv[1], device, torch.float32, shard=lambda m: ssd.shard_model(m, ssd.Config(), device))
kept, peak = resident() - before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
full = load_file(sys.argv[1] + "/model.safetensors")
for name, p in model.named_parameters():
    local, start = ssd.local_shard(p)
    for key, where in ssd.checkpoint_pieces(name, p.shape, model.config):
        if not where:
            assert torch.equal(local, full[key].float()[start:start + len(local)]), key
        elif start <= where[0] < start + len(local):
            assert torch.equal(local[(where[0] - start,) + where[1:]], full[key].float()), key
shard = sum(ssd.local_shard(p)[0].nbytes for p in model.parameters())
fp32 = sum(p.numel() * 4 for p in model.parameters())
print(json.dumps({"rank": rank, "kept": kept, "peak": peak, "shard": shard, "fp32": fp32}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("which", ["dense-44M-bf16", "moe"])
def test_ranks_load_only_their_shards(which, tmp_path):
    """2 ranks: each rank's shard holds exactly its rows of the checkpoint (whole experts for MoE), and loading
    leaves a rank's memory grown by its shard, never by the full fp32 model every rank held before."""
    from helpers import make_hf_model
    if which == "moe":
        path = REPO / "tests" / "assets" / "tiny-qwen3-moe"
    else:
        path, _ = make_hf_model("qwen3", tmp_path, dtype=torch.bfloat16, vocab_size=32768, hidden_size=512,
                                intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                                num_key_value_heads=4, head_dim=64)
    script = tmp_path / "load_check.py"
    script.write_text(LOAD_CHECK)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}", str(script), str(path)], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for r in reports:
        assert r["shard"] <= r["fp32"] // 2 + 2**20
        if which != "moe":  # big enough for the process's memory to show it
            # What stays is the shard; at the peak the mapped file pages of the rank's bf16 slices (a quarter of
            # the fp32 model on 2 ranks) and one slice in flight come on top, still below the whole fp32 model
            # that every rank held before.
            assert r["kept"] < r["shard"] + 2**24 and r["peak"] < r["fp32"], r


def test_kill_and_resume_is_bit_identical(tiny_model_dir, prompts_path, tmp_path):
    records = make_records(16)
    flags = dict(max_steps=16, save_steps=2, per_device_train_batch_size=4, gradient_checkpointing=True)
    killed = prepare_run(tmp_path / "killed", base_argv(tiny_model_dir, prompts_path, **flags), records)
    reference = prepare_run(tmp_path / "reference", base_argv(tiny_model_dir, prompts_path, **flags), records)
    log = tmp_path / "killed" / "metrics.jsonl"

    proc = subprocess.Popen([sys.executable, "ssd.py"] + killed, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    # Kill once step 3 is logged: a training state (step 2) exists and the log runs ahead of it.
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and \
            (not log.exists() or log.read_text().count("\n") < 3):
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended on its own before the kill: {stderr[-2000:]}"
    assert not (tmp_path / "killed" / "config.json").exists()
    assert (tmp_path / "killed" / "train_state").exists() or (tmp_path / "killed" / "train_state.old").exists()

    assert "resuming training at step" in run_cli(killed).stdout  # the same command resumes
    run_cli(reference)  # an uninterrupted run, the same way (one thread: CPU float sums follow the thread count)
    w_resumed, w_ref = weights(tmp_path / "killed"), weights(tmp_path / "reference")
    assert w_resumed.keys() == w_ref.keys()
    for name in w_ref:
        assert torch.equal(w_resumed[name], w_ref[name]), name
    m_resumed, m_ref = metrics(tmp_path / "killed"), metrics(tmp_path / "reference")
    assert [m["step"] for m in m_resumed] == list(range(1, 17))  # every step logged exactly once
    assert [(m["loss"], m["grad_norm"]) for m in m_resumed] == [(m["loss"], m["grad_norm"]) for m in m_ref]
    assert not (tmp_path / "killed" / "train_state").exists()


def test_rerun_before_the_first_save_logs_each_step_once(tiny_model_dir, prompts_path, tmp_path):
    """A run killed before its first training state restarts at step 0: the rows it logged must not stay twice."""
    out = tmp_path / "run"
    argv = prepare_run(out, base_argv(tiny_model_dir, prompts_path, max_steps=3), make_records(8))
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (1, 2)))
    ssd.main(argv)
    assert [m["step"] for m in metrics(out)] == [1, 2, 3] and all(m["loss"] != 9.0 for m in metrics(out))


def test_state_swap_survives_a_kill_between_its_renames(tmp_path):
    """A kill after `state.tmp -> state`, before `state.old` is removed, leaves both: the next save must still work."""
    path = tmp_path / "train_state"
    ssd.save_state(path, {"step": 1, "world": 1}, rank=0)
    (tmp_path / "train_state.old").mkdir()
    (tmp_path / "train_state.old" / "rank0.pt").write_bytes(b"stale")
    ssd.save_state(path, {"step": 2, "world": 1}, rank=0)
    assert ssd.load_state(path, 0, 1)["step"] == 2 and not (tmp_path / "train_state.old").exists()
