"""Simple Self-Distillation (SSD) for code generation, in one file (arXiv 2604.01193).

Sample completions for coding prompts from the frozen base model at a training-time temperature with top-k / top-p
truncation, drop empty or stub outputs, fine-tune on the raw, unverified samples with plain cross-entropy, then decode
at a separately tuned evaluation temperature. The file reads in pipeline order: config and CLI -> model ->
checkpoint I/O -> paged sampling engine -> SSD data phase -> training -> main. Usage (README has the CPU demo):

    torchrun --nproc_per_node=8 ssd.py --temperature 1.6
"""

import dataclasses
import gc
import json
import math
import os
import shutil
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ssd_kernels import fast_paths
from ssd_kernels.cuda_graphs import GraphedDecode, eager_decode
from ssd_kernels.fast_paths import FAST_PATH_STATUS, FAST_PATHS, call_fast
from ssd_kernels.paged_attention import check_paged_attention, paged_decode_attention, paged_decode_attention_reference
from ssd_kernels.sampling import check_sampler, check_sampling_args, sample_next_token, sample_next_token_reference


class SSDError(RuntimeError):
    """Bad input or an unusable setup: the message is one line naming the problem and the fix."""


# ---------------------------------------------------------------- config and CLI --------------------------------------

@dataclass
class Config:
    # Flag names follow TRL's SSD script where the concept is the same. Defaults are the paper's Qwen3-4B-Instruct setup
    # (the authors' recipe in apple/ml-ssd issue #7: AdamW 0.9/0.95, weight decay 0.1, cosine 5e-6 -> 1e-6, 2,500 steps
    # with 250 warmup, global batch 32). The comment beside a field is its --help text.
    model_name_or_path: str = "Qwen/Qwen3-4B-Instruct-2507"  # local model directory or hub id
    output_dir: str = "ssd-output"  # samples, training state, metrics and the final model
    seed: int = 42  # sampling seed and training data order
    # prompts
    dataset_name: str = "microsoft/rStar-Coder"  # hub dataset, used when --dataset_path is not given
    dataset_config: str = "seed_sft"  # hub dataset config
    dataset_split: str = "train"  # split of a hub dataset or of a save_to_disk DatasetDict
    dataset_path: str = ""  # local .jsonl / .json / .parquet / .csv file, or a folder written by save_to_disk
    prompt_column: str = "question"  # column holding a string or a list of chat messages
    max_prompts: int = 0  # use the first N prompts; 0 = all
    prompt_format: str = "chat"  # chat: the tokenizer's chat template; raw: our instruction + the text as it is
    chat_template_kwargs: str = "{}"  # JSON for the chat template, e.g. '{"enable_thinking": false}'
    max_prompt_length: int = 4096  # longer prompts are cut from the left
    # sampling (the training-time decoding settings T_train, top-k, top-p)
    temperature: float = 1.6  # T_train
    top_k: int = 20  # 0 = off
    top_p: float = 0.8  # 1 = off
    min_p: float = 0.0  # 0 = off
    max_completion_length: int = 65536  # new tokens per completion
    num_samples: int = 1  # completions per prompt
    generation_batch_size: int = 64  # rows decoded together
    cache_tokens: int = 0  # KV-cache token budget; 0 = all rows on CPU, 80% of free memory on CUDA
    # filtering
    filter_empty: bool = True  # drop empty completions and single lines shorter than 10 characters
    drop_truncated: bool = False  # drop completions that hit --max_completion_length without an end token
    drop_shortest: float = 0.0  # fraction of the shortest kept completions (by characters) to drop too
    sample_only: bool = False  # stop after writing samples.jsonl
    # training
    learning_rate: float = 5e-6  # peak learning rate
    min_lr_ratio: float = 0.2  # the cosine decays to learning_rate * min_lr_ratio (5e-6 -> 1e-6)
    warmup_ratio: float = 0.1  # linear warmup over this fraction of the steps
    warmup_steps: int = 0  # overrides warmup_ratio when > 0
    weight_decay: float = 0.1  # AdamW's decoupled weight decay, on weight matrices only (never norms or biases)
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.95  # AdamW beta2
    adam_epsilon: float = 1e-8  # AdamW epsilon
    max_grad_norm: float = 1.0  # clip the global gradient norm; 0 = no clipping
    num_train_epochs: float = 1.0  # used when max_steps <= 0
    max_steps: int = 2500  # optimizer steps
    per_device_train_batch_size: int = 4  # sequences per rank per accumulation step: 4 x 8 GPUs = 32 global
    gradient_accumulation_steps: int = 1  # accumulation steps per optimizer step
    max_tokens_per_microbatch: int = 65536  # sequences are packed into rows of at most this many tokens
    gradient_checkpointing: bool = True  # recompute each block's activations in backward
    bf16: bool = True  # bf16 compute with fp32 master weights on CUDA; CPU always runs fp32
    logging_steps: int = 1  # metrics.jsonl row every N steps
    save_steps: int = 100  # resumable training state every N steps
    rounds: int = 1  # > 1: sample again from the model just trained and train again (iterated SSD)
    # LoRA (the paper fine-tunes every weight; LoRA runs ablations on one GPU and usually wants a --learning_rate ~1e-4)
    lora_r: int = 0  # rank of LoRA adapters trained on the frozen model (output: a PEFT adapter); 0 = full fine-tune
    lora_alpha: int = 32  # the adapters' update is scaled by lora_alpha / lora_r (TRL's default)
    lora_dropout: float = 0.05  # dropout on the adapters' input in training (TRL's default)
    lora_target_modules: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # comma-separated HF names
    merge_lora: bool = False  # write the full model with the adapter merged in, instead of the PEFT adapter
    # CUDA fast paths: each is checked against its torch reference at startup, and replaced by it if it fails there
    fused_sampler: bool = True  # the fused Triton sampler (off: the torch reference sampler)
    paged_attention: bool = True  # the Triton paged decode-attention kernel (off: the torch reference)
    cuda_graphs: bool = True  # replay decode steps as CUDA graphs (off: launch them one by one)
    flash_varlen: bool = True  # flash attention's varlen kernel for packed bf16 rows (off: one SDPA per sequence)
    grouped_mm: bool = True  # one F.grouped_mm for all MoE experts in bf16 (off: a loop over the experts)
    dist_timeout: float = 30.0  # minutes a rank waits for the others at a collective before the run stops
    preflight: bool = False  # check this GPU machine (self-tests, CUDA tests, benchmarks, a training step) and exit


def parse_args(argv=None) -> Config:
    """One --flag per Config field, with the comment beside the field as its help; bools as --x / --no-x."""
    import inspect
    import re
    from argparse import ArgumentParser, BooleanOptionalAction, RawDescriptionHelpFormatter
    parser = ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(Config)
    helps = dict(re.findall(r"^    (\w+): .*?  # (.*)$", inspect.getsource(Config), re.M))
    for f in dataclasses.fields(Config):
        kind, text = hints[f.name], helps[f.name].replace("%", "%%") + " (default: %(default)s)"
        how = dict(action=BooleanOptionalAction) if kind is bool else dict(type=kind, metavar=kind.__name__.upper())
        parser.add_argument(f"--{f.name}", default=f.default, help=text, **how)
    return Config(**vars(parser.parse_args(argv)))


# ---------------------------------------------------------------- model -----------------------------------------------

SUPPORTED_FAMILIES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2": "Qwen2ForCausalLM",
                      "llama": "LlamaForCausalLM"}


@dataclass
class ModelConfig:
    family: str  # qwen3 | qwen3_moe | qwen2 | llama
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # Llama-3 "llama3" scaling parameters, else None
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2: biases on q, k, v
    o_bias: bool  # Llama / Qwen3 attention_bias also puts a bias on o
    max_position_embeddings: int
    num_experts: int  # Qwen3-MoE: experts per MoE layer (0: a dense model)
    experts_per_token: int
    moe_intermediate_size: int
    norm_topk_prob: bool  # renormalise the chosen experts' router probabilities to sum to 1
    moe_layers: list  # the layers whose MLP is a mixture of experts
    eos_token_ids: list  # every id that ends a sequence
    hf_config: dict  # the checkpoint's config.json and generation_config.json, written back on save
    generation_config: dict


def model_config_from_hf(hf: dict, generation_config: dict | None = None, eos_token_ids=()) -> ModelConfig:
    """Read a Hugging Face config.json (old `rope_theta`/`rope_scaling` keys or transformers 5 `rope_parameters`)."""
    family = hf.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        arch = (hf.get("architectures") or ["?"])[0]
        supported = ", ".join(f"{a} ({f})" for f, a in SUPPORTED_FAMILIES.items())
        raise SSDError(f"unsupported architecture {arch} (model_type {family!r}); supported: {supported}")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise SSDError(f"unsupported rope_type {rope_type!r} in config.json; supported: default, llama3")
    heads, layers = hf["num_attention_heads"], hf["num_hidden_layers"]
    max_positions = hf.get("max_position_embeddings", 32768)
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None  # transformers' rule
    types = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28) else "full"
                                      for i in range(layers)]
    if window and window < max_positions and "sliding_attention" in types:
        raise SSDError(f"config.json turns on sliding-window attention (use_sliding_window, a {window}-token window), "
                       "which ssd.py does not implement; use a checkpoint with full attention")
    bias = bool(hf.get("attention_bias", False))
    experts = hf.get("num_experts", hf.get("num_local_experts", 0)) if family == "qwen3_moe" else 0
    moe_layers = [i for i in range(layers) if experts and i not in (hf.get("mlp_only_layers") or [])
                  and (i + 1) % hf.get("decoder_sparse_step", 1) == 0]  # transformers' rule
    return ModelConfig(
        family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=layers, num_heads=heads,
        intermediate_size=hf["intermediate_size"], num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
        rope_scaling=rope if rope_type == "llama3" else None, tie_word_embeddings=bool(hf.get("tie_word_embeddings")),
        qkv_bias=family == "qwen2" or bias, o_bias=family != "qwen2" and bias, max_position_embeddings=max_positions,
        num_experts=experts, experts_per_token=hf.get("num_experts_per_tok", 0), moe_layers=moe_layers,
        moe_intermediate_size=hf.get("moe_intermediate_size", 0), norm_topk_prob=bool(hf.get("norm_topk_prob")),
        eos_token_ids=list(eos_token_ids), hf_config=hf, generation_config=generation_config or {})


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies, with Llama-3's long-context rescaling when the config asks for it."""
    d = cfg.head_dim  # on the CPU even under the meta device, where division would import torch._dynamo (see Decoder)
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    if cfg.rope_scaling is None:
        return inv_freq
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    factor, low, high, old_len = (cfg.rope_scaling[k] for k in keys)
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by `factor`, short ones kept, and the band between them interpolated smoothly.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding; x is (B, T, heads, head_dim), cos/sin are (B, T, 1, head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 and scale in the input dtype, as the reference implementations do.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


@dataclass
class PagedKV:
    """The paged KV cache: one pool of fixed-size blocks holding every layer's keys and values, shared by all sequences.

    Sequence s keeps its token t at block table_s[t // block_size], offset t % block_size. A forward writes the keys and
    values of its new tokens at (`blocks`, `offsets`), one entry per token. A prefill (`docs` set) runs whole sequences
    packed end to end in one row, as training does; a decode brings one token per row and attends over the row's
    blocks `tables` (B, W) up to its length `lens` (B,). On CPU, which has no paged kernel, a decode window first copies
    each row's blocks once into `rows`, contiguous (keys, values) of (layers, B, kv_heads, tokens, head_dim), and its
    steps attend over that copy, writing their new keys into both (up to the pool's size again in memory; on CUDA
    the kernel, or its reference layer by layer, reads the blocks themselves).
    """
    k: torch.Tensor  # (layers, blocks, kv_heads, block_size, head_dim)
    v: torch.Tensor
    blocks: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    docs: "Documents | None" = None
    tables: torch.Tensor | None = None
    lens: torch.Tensor | None = None
    rows: tuple | None = None


@dataclass
class Documents:
    """Training sequences packed end to end into one row, positions restarting at each: every token attends only
    to the earlier tokens of its own sequence, so packing changes no loss and no gradient."""
    cu_lens: torch.Tensor  # (sequences + 1,) int32 on the device: where each sequence starts, then the row's length
    lens: list  # each sequence's length


def document_attention(q, k, v, docs: Documents):
    """Causal attention inside each packed sequence; q, k, v are (1, tokens, heads, head_dim). On CUDA in bf16 or
    fp16, flash attention's variable-length kernel in one call; elsewhere (CPU, fp32) one causal SDPA per sequence,
    which, unlike one masked SDPA over the row, computes no pair of tokens from different sequences and builds no
    (tokens x tokens) mask."""
    gqa = k.shape[2] != q.shape[2]
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and FAST_PATHS["flash_varlen"]:
        from torch.nn.attention.varlen import varlen_attn
        longest = max(docs.lens)
        return varlen_attn(q[0], k[0], v[0], docs.cu_lens, docs.cu_lens, longest, longest, window_size=(-1, 0),
                           enable_gqa=gqa)[None]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (1, heads, tokens, head_dim)
    ys = [F.scaled_dot_product_attention(*qkv, is_causal=True, enable_gqa=gqa)
          for qkv in zip(*(t.split(docs.lens, dim=2) for t in (q, k, v)))]
    return torch.cat(ys, dim=2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.head_dim = layer, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.family.startswith("qwen3"):  # Qwen3 normalises every query and key head before the rotation
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, positions, layout):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(layout, Documents):  # packed training rows
            return self.o_proj(document_attention(q, k, v, layout).reshape(B, T, -1))
        if layout is None:  # whole causal rows (a full forward: right padding never reaches a real token)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                               enable_gqa=self.n_kv != self.n_heads)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        cache, new_k, new_v = layout, k.flatten(0, 1), v.flatten(0, 1)  # the new tokens', (tokens, kv_heads, head_dim)
        cache.k[self.layer, cache.blocks, :, cache.offsets] = new_k
        cache.v[self.layer, cache.blocks, :, cache.offsets] = new_v
        if cache.docs is not None:  # a prefill of packed sequences
            y = document_attention(q, k, v, cache.docs)
        elif cache.rows is not None:  # a decode step over this window's contiguous copy of the rows
            y = row_attention(q[:, 0], new_k, new_v, cache, self.layer)
        else:  # a decode step over each row's own blocks (Triton on CUDA)
            y = call_fast("paged_attention", paged_decode_attention, paged_decode_attention_reference, q[:, 0],
                          cache.k[self.layer], cache.v[self.layer], cache.tables, cache.lens)
        return self.o_proj(y.reshape(B, T, -1))


def row_attention(q, new_k, new_v, cache: PagedKV, layer: int, chunk: int = 8) -> torch.Tensor:
    """One query per row (B, heads, head_dim) over its contiguous keys and values in `cache.rows`, after writing the
    new token's there at position lens - 1; slots past a row's length are masked by position, never by value. Each
    `chunk` rows attend only up to their longest (decode_window puts the rows longest first, so the short ones do
    not pay for the longest one's keys; a host read of the lengths is free on CPU, the only device this runs on)."""
    keys, values = cache.rows[0][layer], cache.rows[1][layer]  # (B, kv_heads, tokens, head_dim)
    rows, last = torch.arange(len(q), device=q.device), cache.lens - 1
    keys[rows, :, last], values[rows, :, last] = new_k, new_v
    q, lens, ys = q.unflatten(1, (keys.shape[1], -1)), cache.lens.tolist(), []
    for a in range(0, len(q), chunk):
        n, b = max(lens[a:a + chunk]), a + chunk
        inside = torch.arange(n, device=q.device) < cache.lens[a:b, None]
        ys.append(F.scaled_dot_product_attention(q[a:b], keys[a:b, :, :n], values[a:b, :, :n],
                                                 attn_mask=inside[:, None, None, :]))
    return torch.cat(ys).flatten(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Qwen3-MoE's sparse MLP: a softmax router picks each token's top-k experts and sums their SwiGLU outputs weighted
    by those probabilities (renormalised if norm_topk_prob); the experts are stacked in (experts, out, in) tensors."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.experts_per_token, cfg.norm_topk_prob
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate = nn.Linear(h, e, bias=False)  # the router
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))  # each expert's gate_proj rows, then up_proj's
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x):
        shape, x = x.shape, x.reshape(-1, x.shape[-1])
        probs = self.gate(x).float().softmax(-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        # Every (token, choice) pair, grouped by expert: the experts then run on contiguous slices of tokens.
        order = experts.flatten().argsort(stable=True)
        tokens, chosen = order // self.top_k, experts.flatten()[order]
        counts = torch.bincount(chosen, minlength=len(self.down_proj))
        if x.is_cuda and x.dtype == torch.bfloat16 and FAST_PATHS["grouped_mm"]:  # all experts at once, no host sync
            y = self.grouped_experts(x[tokens], chosen, counts)
        else:  # a plain loop over the experts that have tokens (one host sync)
            ends = counts.cumsum(0).tolist()
            y = torch.cat([self.expert(x[tokens[a:b]], e) for e, (a, b) in enumerate(zip([0] + ends, ends)) if b > a])
        y = y * weights.flatten()[order, None].to(y.dtype)
        return torch.zeros_like(x).index_add_(0, tokens, y).reshape(shape)

    def expert(self, x, e: int):
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])

    def grouped_experts(self, xs, chosen, counts, align: int = 16):
        """F.grouped_mm over expert groups padded to multiples of `align` rows (its kernels' alignment); the padded
        buffer has a size fixed by the shapes, so nothing waits for the counts."""
        padded = (counts + align - 1) // align * align
        starts, padded_starts = counts.cumsum(0) - counts, padded.cumsum(0) - padded
        rows = padded_starts[chosen] + torch.arange(len(chosen), device=xs.device) - starts[chosen]
        buf = xs.new_zeros(len(chosen) + align * len(counts), xs.shape[1]).index_copy_(0, rows, xs)
        offs = padded.cumsum(0).to(torch.int32)
        gate, up = F.grouped_mm(buf, self.gate_up_proj.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        return F.grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=offs)[rows]


class LoRALinear(nn.Module):
    """PEFT's LoRA: x W^T + b + (alpha / r) dropout(x) A^T B^T with W, b frozen and A (r, in), B (out, r) trained in
    fp32. The layer's own `weight` and `bias` keep their checkpoint names; A and B are named as in PEFT's files."""

    def __init__(self, base: nn.Linear, r: int, alpha: int, dropout: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = nn.Parameter(torch.zeros(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        self.scale, self.dropout = alpha / r, nn.Dropout(dropout)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) \
            * self.scale


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def apply_lora(model, cfg: Config, device="cpu"):
    """Freeze the model (bf16 on CUDA with --bf16, where FSDP computes in bf16 anyway; else fp32) and wrap each linear
    layer named in --lora_target_modules in a LoRALinear (init_lora_ fills A and B). --lora_r 0: the model as it is."""
    if not cfg.lora_r:
        return model
    targets = cfg.lora_target_modules.split(",")
    if unknown := [t for t in targets if t not in LORA_TARGETS]:
        raise SSDError(f"--lora_target_modules: unknown module {unknown[0]!r}; choose from {','.join(LORA_TARGETS)}")
    if model.config.moe_layers and {"gate_proj", "up_proj", "down_proj"} & set(targets):
        raise SSDError("LoRA on the MoE experts is not supported (they are stacked tensors, not linear layers); "
                       "pass --lora_target_modules q_proj,k_proj,v_proj,o_proj")
    bf16 = cfg.bf16 and torch.device(device).type == "cuda"
    model.to(torch.bfloat16 if bf16 else torch.float32).requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout))
    return model


@torch.no_grad()
def init_lora_(model, seed: int):
    """PEFT's start: A Kaiming-uniform, B zero. A is drawn whole from `seed` and each FSDP rank keeps its rows (the
    same start on any number of ranks); the global RNG (dropout masks) is seeded per rank, so a run is reproducible."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + (dist.get_rank() if dist.is_initialized() else 0))
    for m in (m for m in model.modules() if isinstance(m, LoRALinear)):
        a = nn.init.kaiming_uniform_(torch.empty(m.lora_A.shape), a=math.sqrt(5), generator=g)
        (local, start), (b, _) = local_shard(m.lora_A), local_shard(m.lora_B)
        local.copy_(a[start:start + len(local)]), b.zero_()


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if layer in cfg.moe_layers else MLP(cfg)

    def forward(self, x, cos, sin, positions, layout=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, layout)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embedding, blocks and final norm; named like Hugging Face's `model.*` so checkpoints map key for key."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # On the meta device (load_model) the table skips nn.Embedding's random init: there normal_, like division,
        # runs torch's Python reference, which imports torch._dynamo (~150 MiB, ~1.5 s per process).
        meta = torch.get_default_device().type == "meta"
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size) if meta else None)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        # A tied head reads the embedding matrix itself (checkpoints of tied models have no lm_head.weight).
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg).to(torch.get_default_device()), persistent=False)
        self.checkpointing = False  # training: recompute each block's activations in the backward pass

    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def hidden(self, input_ids, positions, layout: PagedKV | Documents | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, hidden) for tokens at explicit per-token positions (B, T)."""
        x = self.model.embed_tokens(input_ids)
        freqs = positions[..., None].float() * self.inv_freq  # rotary angles in fp32, (B, T, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for block in self.model.layers:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, positions, layout, use_reentrant=False)
            else:
                x = block(x, cos, sin, positions, layout)
        return self.model.norm(x)

    def forward(self, input_ids, positions, layout: PagedKV | Documents | None = None, targets=None) -> torch.Tensor:
        """Logits (B, T, vocab); with `targets` (B, T, -100 = no loss) the summed cross-entropy instead.

        `layout` says how the tokens relate: None, whole causal rows (right padding never reaches a real token);
        a PagedKV, sampling against the KV cache; Documents, packed training rows.
        The loss lives in forward so that FSDP's hooks around the root module also cover the output head.
        """
        h = self.hidden(input_ids, positions, layout)
        if targets is None:
            return F.linear(h, self.head_weight())
        scored = targets != -100  # only completion tokens ever meet the vocab-size head
        return chunked_cross_entropy(h[scored], self.head_weight(), targets[scored])


CE_CHUNK = 4096  # tokens per cross-entropy chunk: vocab-size logits never exist for a whole long sequence


def chunk_cross_entropy(h, weight, targets):
    return F.cross_entropy(F.linear(h, weight).float(), targets, reduction="sum")


def chunked_cross_entropy(h, weight, targets) -> torch.Tensor:
    """Sum of token cross-entropies; each chunk's logits are recomputed in backward instead of being stored, but the
    last chunk's, whose backward runs first."""
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, len(targets), CE_CHUNK):
        piece = h[s:s + CE_CHUNK], weight, targets[s:s + CE_CHUNK]
        last = s + CE_CHUNK >= len(targets)
        total = total + (chunk_cross_entropy(*piece) if last else checkpoint(chunk_cross_entropy, *piece,
                                                                                use_reentrant=False))
    return total


# ---------------------------------------------------------------- checkpoint I/O --------------------------------------

def resolve_model_dir(name_or_path: str) -> Path:
    """A local model directory as it is, or a hub id downloaded (weights, configs, tokenizer) into the HF cache."""
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SSDError(f"{path} has no config.json; pass a Hugging Face model directory")
        return path
    if path.exists() or name_or_path.count("/") != 1:
        raise SSDError(f"model {name_or_path!r} is neither a model directory nor a hub id like Qwen/Qwen3-4B")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                                    "*.jinja", "tokenizer*"]))
    except Exception as e:  # offline, unknown repo, gated repo, ...: one line, not a stack trace
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SSDError(f"cannot download {name_or_path!r} from the Hugging Face Hub ({type(e).__name__}: {reason}); "
                       "check the id and the network, or pass a local model directory") from None


def end_token_ids(generation_config: dict, tokenizer) -> list:
    """Every id that ends a sequence: generation_config.json's eos_token_id (int or list), then the tokenizer's."""
    eos = generation_config.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return list(dict.fromkeys(ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])))


def checkpoint_pieces(name: str, shape, cfg: ModelConfig) -> list:
    """The checkpoint tensors that make up our parameter `name`, as (key, index into the parameter) pairs: one for
    most, and one per expert (and per gate / up half) for the stacked MoE experts, which transformers stores apart."""
    base = name.rpartition(".")[0] + ".experts."
    if name.endswith(".mlp.gate_up_proj"):
        i = cfg.moe_intermediate_size
        return [(f"{base}{e}.{kind}_proj.weight", (e, slice(k * i, (k + 1) * i)))
                for e in range(shape[0]) for k, kind in enumerate(("gate", "up"))]
    if name.endswith(".mlp.down_proj"):
        return [(f"{base}{e}.down_proj.weight", (e,)) for e in range(shape[0])]
    return [(name, ())]


def local_shard(p) -> tuple:
    """(this rank's tensor of parameter p, the first row of the full tensor it holds): FSDP2 cuts dim 0 like chunk;
    a tensor FSDP does not manage is whole. (Asked by attribute: importing DTensor to ask costs ~0.4 s.)"""
    if not hasattr(p, "device_mesh"):
        return p, 0
    rows = -(-p.shape[0] // p.device_mesh.size())
    return p.to_local(), min(p.device_mesh.get_local_rank() * rows, p.shape[0])


@torch.no_grad()
def load_model(name_or_path: str, device="cpu", dtype=torch.bfloat16, shard=None, fill: bool = True):
    """Our Transformer and the tokenizer from a Hugging Face checkpoint (single or sharded safetensors). Built on the
    meta device and split there by `shard(model)` (FSDP), each rank's part is read slice by slice: no rank holds more
    than its shard and one checkpoint tensor. fill=False leaves it uninitialised (a resumed run fills it)."""
    from safetensors import safe_open
    from transformers import AutoTokenizer
    if (Path(name_or_path) / "adapter_config.json").is_file():  # a PEFT LoRA adapter: its base, merged with it
        return load_adapter(Path(name_or_path), device, dtype, shard, fill)
    model_dir = resolve_model_dir(name_or_path)
    hf = json.loads((model_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    gen_file = model_dir / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    cfg = model_config_from_hf(hf, gen, end_token_ids(gen, tokenizer))
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        ["model.safetensors"]
    if not all((model_dir / f).is_file() for f in files):
        raise SSDError(f"{model_dir} lacks safetensors weights ({', '.join(files)}); convert the checkpoint first")
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
        if shard is not None:
            model = shard(model)
    model.to_empty(device=device)
    model.inv_freq = rope_inv_freq(cfg).to(device)  # to_empty left the buffer uninitialised; keep it in fp32
    # checkpoint key -> where it goes: (local tensor, its first row, index in the parameter, shape); not LoRA's A, B
    targets = {key: (*local_shard(p), where, torch.empty(p.shape, device="meta")[where].shape)
               for name, p in model.named_parameters() if not name.endswith((".lora_A", ".lora_B"))
               for key, where in checkpoint_pieces(name, p.shape, cfg)}
    for f in files if fill else []:
        with safe_open(model_dir / f, framework="pt") as st:
            for key in st.keys():
                if key == "lm_head.weight" and model.lm_head is None:
                    continue  # some tied checkpoints still carry a copy of the embedding
                if key not in targets:
                    raise SSDError(f"unexpected tensor {key} in {f}: the checkpoint does not match config.json")
                local, start, where, shape = targets.pop(key)
                part = st.get_slice(key)
                if tuple(part.get_shape()) != tuple(shape):
                    raise SSDError(f"{key} has shape {tuple(part.get_shape())} in {f} but config.json implies "
                                   f"{tuple(shape)}")
                if not where:  # this rank's rows of a whole parameter
                    local.copy_(part[start:start + len(local)])
                elif start <= where[0] < start + len(local):  # one expert, if it lives on this rank
                    local[(where[0] - start,) + where[1:]].copy_(part[:])
    if targets and fill:
        raise SSDError(f"{model_dir} is missing {len(targets)} tensors, e.g. {sorted(targets)[0]}")
    return model.eval(), tokenizer


def save_model(model: Transformer, tokenizer, out_dir, state_dict=None, max_shard_bytes: int = 5 * 2**30):
    """A checkpoint transformers loads (safetensors sharded above `max_shard_bytes`), from `state_dict` if given (the
    weights a distributed run gathered). Written to a temporary folder and moved in with config.json last, the old one
    removed first: a crash leaves the old model or a folder without config.json, never a loadable half model."""
    from safetensors.torch import save_file
    cfg, out = model.config, Path(out_dir)
    sd = model.state_dict() if state_dict is None else state_dict
    tensors = {key: v.detach()[where].to("cpu").contiguous() for k, v in sd.items() if k != "inv_freq"
               for key, where in checkpoint_pieces(k, v.shape, cfg)}  # experts one by one, as transformers has them
    tmp = out / ".tmp-save"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards, size = [{}], 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards, size = shards + [{}], 0
        shards[-1][name], size = t, size + t.nbytes
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)] if n > 1 else ["model.safetensors"]
    for shard, fname in zip(shards, names):
        save_file(shard, tmp / fname, metadata={"format": "pt"})
    if n > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": {k: fname for shard, fname in zip(shards, names) for k in shard}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps({**cfg.hf_config, "torch_dtype": dtype, "dtype": dtype}, indent=2))
    gen = {**cfg.generation_config, "eos_token_id": cfg.eos_token_ids}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    tokenizer.save_pretrained(tmp)
    (out / "config.json").unlink(missing_ok=True)
    for old in out.glob("model*.safetensors*"):  # shards of an earlier save that this one may not overwrite
        old.unlink()
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
        os.replace(f, out / f.name)
    tmp.rmdir()


@torch.no_grad()
def merge_lora_(weights: dict, adapter: dict, scale: float):
    """Add scale * B @ A into each adapted weight in place (in fp32, rounded once to the weight's dtype). `weights`
    maps our parameter names to tensors or FSDP shards (which take their rows of B); `adapter` has PEFT's keys."""
    if unused := [k for k in adapter if not k.endswith((".lora_A.weight", ".lora_B.weight"))]:
        raise SSDError(f"the adapter has weights other than LoRA A/B matrices ({unused[0]}, ...): biases or "
                       "embedding adapters are not supported; merge it with peft's merge_and_unload instead")
    for key, a in adapter.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            if name not in weights:
                raise SSDError(f"the adapter's {key} matches no weight of the model")
            local, start = local_shard(weights[name])
            b = adapter[key.replace(".lora_A.", ".lora_B.")][start:start + len(local)]
            delta = b.to(local.device, torch.float32) @ a.to(local.device, torch.float32)
            local.copy_((local.float() + scale * delta).to(local.dtype))


def load_adapter(path: Path, device, dtype, shard, fill: bool):
    """load_model for a PEFT LoRA adapter directory: its base model with the adapter merged in."""
    from safetensors.torch import load_file
    c = json.loads((path / "adapter_config.json").read_text())
    if c.get("peft_type") != "LORA" or any(c.get(k) for k in ("use_rslora", "use_dora", "rank_pattern",
                                                              "alpha_pattern", "modules_to_save")):
        raise SSDError(f"{path} is not a plain LoRA adapter (rsLoRA, DoRA, per-module ranks and extra modules are "
                       "not supported); merge it with peft and pass the merged model")
    model, tokenizer = load_model(c["base_model_name_or_path"], device, dtype, shard, fill)
    if fill:
        adapter = load_file(path / "adapter_model.safetensors")
        merge_lora_(dict(model.named_parameters()), adapter, c["lora_alpha"] / c["r"])
    return model, tokenizer


def save_lora(model: Transformer, tokenizer, out_dir, state_dict: dict, cfg: Config, base: str):
    """A LoRA run's output from its gathered weights: a PEFT adapter for `base` (fp32, PEFT's key names; written last,
    adapter_config.json marks the round done), or, with --merge_lora and before the last round, the merged model."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    adapter = {f"base_model.model.{k}.weight": state_dict.pop(k) for k in list(state_dict) if ".lora_" in k}
    if cfg.merge_lora or out != Path(cfg.output_dir):
        merge_lora_(state_dict, adapter, cfg.lora_alpha / cfg.lora_r)
        return save_model(model, tokenizer, out, state_dict=state_dict)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_r, "lora_alpha": cfg.lora_alpha,
              "lora_dropout": cfg.lora_dropout, "target_modules": sorted({k.split(".")[-3] for k in adapter}),
              "base_model_name_or_path": str(Path(base).resolve()) if Path(base).is_dir() else base}
    (out / "adapter_config.json").unlink(missing_ok=True)
    save_file(adapter, out / "adapter_model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    (out / "adapter_config.tmp").write_text(json.dumps(config, indent=2))
    os.replace(out / "adapter_config.tmp", out / "adapter_config.json")


# ---------------------------------------------------------------- batched KV-cached sampler ---------------------------

KV_BLOCK = 256  # tokens per block of the paged KV cache
PREFILL_TOKENS = 16384  # tokens per prefill forward: bounds the activations of admitting many prompts
RETIRE_EVERY = 8  # decode steps the device runs between two looks of the host (retire, refill, grow, preempt)


class Completion(typing.NamedTuple):
    tokens: list  # completion token ids; the end token is included when stop == "eos"
    stop: str  # "eos": an end token was drawn; "length": max_new_tokens reached without one


@dataclass
class Sequence:
    """One (prompt, sample) on its way: its tokens so far and the pool blocks that hold their keys and values."""
    prompt: int
    sample: int
    seq_id: int  # keys its random draws, with the position and the token
    order: int  # place in the queue: the sequence that came last is preempted first
    tokens: list  # prompt + completion so far; the newest token is not in the cache yet
    n_prompt: int
    blocks: list = dataclasses.field(default_factory=list)


class BlockPool:
    """Hands out the pool's blocks with reference counts (a prompt's full blocks serve all its samples).
    Block 0 is never handed out: padding rows and rows past their end write their keys there, and nobody reads it."""

    def __init__(self, n_blocks: int):
        self.free, self.refs = list(range(n_blocks - 1, 0, -1)), [0] * n_blocks

    def take(self, n: int) -> list:
        blocks = [self.free.pop() for _ in range(n)]
        for b in blocks:
            self.refs[b] = 1
        return blocks

    def share(self, blocks: list):
        for b in blocks:
            self.refs[b] += 1

    def release(self, blocks: list):
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free.append(b)


def default_cache_tokens(model: Transformer, rows: int, length: int) -> int:
    """All rows at full length on CPU; on CUDA as many tokens as fit in 80% of the free memory."""
    w, cfg = model.head_weight(), model.config
    if w.device.type != "cuda":
        return rows * length
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * w.element_size()
    return int(0.8 * torch.cuda.mem_get_info(w.device)[0]) // per_token


def prefill(model: Transformer, cache: PagedKV, groups: list) -> torch.Tensor:
    """Run each group's tokens through the model once, packed end to end in one row (no padding), storing keys and
    values in the blocks of its first sequence; returns the last position's hidden state per group (the samples of a
    prompt form one group: one prefill)."""
    device, bs = cache.k.device, cache.k.shape[3]
    seqs = [g[0] for g in groups]
    lens = [len(s.tokens) for s in seqs]
    positions = torch.cat([torch.arange(n) for n in lens])
    blocks = torch.cat([torch.tensor(s.blocks)[torch.arange(n) // bs] for s, n in zip(seqs, lens)])
    cache.blocks, cache.offsets, cache.tables = blocks.to(device), (positions % bs).to(device), None
    cache.docs = Documents(F.pad(torch.tensor(lens).cumsum(0), (1, 0)).to(device, torch.int32), lens)
    ids = torch.tensor([t for s in seqs for t in s.tokens], device=device)
    h = model.hidden(ids[None], positions.to(device)[None], cache)[0]
    ends, cache.docs = cache.docs.cu_lens[1:].long() - 1, None
    return h[ends]


def copy_rows(cache: PagedKV, tables, space: list) -> tuple:
    """The keys and values of each row's blocks `tables` (B, W), copied out by one gather per pool into `space`, two
    flat buffers kept from window to window (fresh pages cost several times the copy): (keys, values), each
    (layers, B, kv_heads, W * block_size, head_dim)."""
    layers, n_blocks, kv_heads, bs, dim = cache.k.shape
    heads = torch.arange(kv_heads, device=tables.device)
    index = (tables.long()[:, None, :] * kv_heads + heads[None, :, None]).flatten()  # (block, kv head) pairs in order
    size = layers * len(index) * bs * dim
    if space[0].numel() < size:
        space[:] = []  # the old buffers go before the new ones come
        space += [cache.k.new_empty(size) for _ in "kv"]
    rows = []
    for pool, buffer in zip((cache.k, cache.v), space):
        out = buffer[:size].view(layers, len(index), bs, dim)
        torch.index_select(pool.view(layers, n_blocks * kv_heads, bs, dim), 1, index, out=out)
        rows.append(out.view(layers, len(tables), kv_heads, -1, dim))
    return tuple(rows)


def decode_step(model: Transformer, cache: PagedKV, draw, tokens, positions, tables, seq_ids) -> torch.Tensor:
    """One token for every row, entirely on the device: feed `tokens` at `positions`, draw the next ones."""
    bs = cache.k.shape[3]
    cache.tables, cache.lens = tables, positions + 1
    cache.blocks, cache.offsets = tables.gather(1, (positions // bs)[:, None])[:, 0], positions % bs
    logits = model(tokens[:, None], positions[:, None], cache)[:, -1]
    return draw(logits, seq_ids, positions + 1)


class Engine:
    """The paged sampler's state: a pool of KV blocks, the queue of waiting groups and the running rows.

    Between two calls: every running sequence holds the blocks of all its cached tokens (the newest token is not
    cached yet); a block's reference count is the number of sequences holding it; the queue holds groups of sequences
    with the same tokens (the samples of a prompt, or one preempted sequence, which holds no blocks), and a sequence
    leaves the engine only through retire(). generate() drives it: admit -> reserve_or_preempt -> decode_window.
    """

    def __init__(self, model: Transformer, draw, *, rows: int, length: int, max_new_tokens: int, eos: set,
                 cache_tokens: int, block_size: int, finish):
        from collections import deque
        cfg, w = model.config, model.head_weight()
        self.model, self.draw, self.finish, self.device = model, draw, finish, w.device
        self.rows, self.max_new_tokens, self.eos, self.block_size = rows, max_new_tokens, eos, block_size
        per_seq = -(-length // block_size)  # blocks of the longest sequence
        cache_tokens = cache_tokens or default_cache_tokens(model, rows, per_seq * block_size)
        if cache_tokens // block_size < per_seq:
            raise SSDError(f"a KV cache of {cache_tokens} tokens holds no sequence of {length} tokens (longest prompt "
                           f"+ new tokens, in blocks of {block_size}); raise --cache_tokens or lower "
                           "--max_completion_length / --max_prompt_length")
        shape = (cfg.num_layers, cache_tokens // block_size + 1, cfg.num_kv_heads, block_size, cfg.head_dim)
        self.cache = PagedKV(*(torch.zeros(shape, device=w.device, dtype=w.dtype) for _ in "kv"))
        self.pool, self.queue, self.running = BlockPool(shape[1]), deque(), []
        self.row_space, self.copied = [self.cache.k.new_empty(0)] * 2, ([], None)  # copy_rows' buffers; their rows
        self.stats = dict(decode_steps=0, rows=0, peak_rows=0, preemptions=0, prefill_tokens=0, tokens=0)
        cache = self.cache  # not self: a cycle through the engine would keep the pool alive until gc runs

        def step(*state):
            return decode_step(model, cache, draw, *state)
        width = -(-(length + RETIRE_EVERY) // block_size)  # a row's table: its length and a window past its end
        graphs = FAST_PATHS["cuda_graphs"] and w.device.type in fast_paths.FAST_PATH_DEVICES
        self.decode = GraphedDecode(step, width, rows, w.device) if graphs else eager_decode(step)

    def blocks_needed(self, n_tokens: int, n_prompt: int) -> int:
        """Blocks a sequence of n_tokens (the newest one not cached yet) writes into by the end of the next window."""
        return -(-min(n_tokens - 1 + RETIRE_EVERY, n_prompt + self.max_new_tokens) // self.block_size)

    def append(self, seq: Sequence, drawn) -> bool:
        """Add drawn tokens up to the sequence's end (an end token, or max_new_tokens): what it drew past its end is
        dropped, and an ended sequence is retired. Returns whether it runs on."""
        for token in drawn:
            seq.tokens.append(token)
            self.stats["tokens"] += 1
            if token in self.eos or len(seq.tokens) - seq.n_prompt >= self.max_new_tokens:
                self.retire(seq, "eos" if token in self.eos else "length")
                return False
        return True

    def retire(self, seq: Sequence, stop: str):
        """Hand a finished sequence's blocks back to the pool and its completion to `finish`."""
        self.pool.release(seq.blocks)
        self.finish(seq, Completion(seq.tokens[seq.n_prompt:], stop))

    def admit(self):
        """Move waiting groups into free rows, one prefill chunk at a time, while the blocks they and the running rows
        need by the end of the next window fit: no row admitted now is preempted before it decodes."""
        while chunk := self.take_chunk():
            self.start(chunk)

    def take_chunk(self) -> list:
        """The next groups (or the front of one) that fit in the free rows and blocks, at most PREFILL_TOKENS tokens,
        given their blocks: a group's full blocks are shared, each sequence owns its partial last block."""
        reserve = sum(self.blocks_needed(len(s.tokens), s.n_prompt) - len(s.blocks) for s in self.running)
        chunk, tokens, bs, pool = [], 0, self.block_size, self.pool
        while self.queue and len(self.running) + sum(map(len, chunk)) < self.rows:
            group, n = self.queue[0], len(self.queue[0][0].tokens)
            full, partial = n // bs, -(-n // bs) - n // bs
            own = self.blocks_needed(n + 1, group[0].n_prompt) - full  # after its first token is drawn
            fit = min(len(group), self.rows - len(self.running) - sum(map(len, chunk)),
                      max(0, len(pool.free) - reserve - full) // own)
            if fit < 1 or chunk and tokens + n > PREFILL_TOKENS:
                break
            take, group[:fit] = group[:fit], []
            if not group:
                self.queue.popleft()
            shared = pool.take(full)
            for k, seq in enumerate(take):
                if k:
                    pool.share(shared)
                seq.blocks = shared + pool.take(partial)
            reserve += fit * (own - partial)
            chunk.append(take)
            tokens += n
        return chunk

    def start(self, chunk: list):
        """Prefill a chunk of groups in one forward and draw each sequence's first token; those that go on run."""
        last = prefill(self.model, self.cache, chunk)
        cache, device = self.cache, self.device
        for group in chunk:  # the partial last block was written for the first sample: copy it for the others
            if len(group) > 1 and len(group[0].tokens) % self.block_size:
                src, dst = group[0].blocks[-1], [s.blocks[-1] for s in group[1:]]
                cache.k[:, dst], cache.v[:, dst] = cache.k[:, [src]], cache.v[:, [src]]
        self.stats["prefill_tokens"] += sum(len(g[0].tokens) for g in chunk)
        rows = torch.tensor([b for b, g in enumerate(chunk) for _ in g], device=device)
        seqs = [s for g in chunk for s in g]
        first = self.draw(F.linear(last[rows], self.model.head_weight()),
                          torch.tensor([s.seq_id for s in seqs], device=device),
                          torch.tensor([len(s.tokens) for s in seqs], device=device)).tolist()
        self.running.extend(s for s, t in zip(seqs, first) if self.append(s, [t]))

    def reserve_or_preempt(self):
        """Give every running row the blocks it writes into by the end of the next window; while they do not fit,
        preempt the sequence that came last (blocks freed, tokens kept, back to the front of the queue)."""
        def need(seq):
            return self.blocks_needed(len(seq.tokens), seq.n_prompt) - len(seq.blocks)
        while sum(map(need, self.running)) > len(self.pool.free):
            victim = max(self.running, key=lambda s: s.order)
            self.running.remove(victim)
            self.pool.release(victim.blocks)
            victim.blocks = []
            self.queue.appendleft([victim])
            self.stats["preemptions"] += 1
        for seq in self.running:
            seq.blocks += self.pool.take(need(seq))

    def row_copy(self, tables, length: int) -> tuple:
        """CPU: the running rows' keys and values, contiguous, up to `length` tokens: the last window's copy while the
        same rows run on within its size (its steps wrote their new keys into it), else a fresh one (copy_rows)."""
        seqs = self.copied[0]
        if len(seqs) != len(self.running) or any(a is not b for a, b in zip(seqs, self.running)) \
                or self.copied[1][0].shape[3] < length:
            self.copied = [], None  # let the old copy go first: copy_rows may need larger buffers
            self.copied = list(self.running), copy_rows(self.cache, tables, self.row_space)
        return tuple(t[:, :, :, :length] for t in self.copied[1])

    def decode_window(self):
        """Decode up to RETIRE_EVERY steps of every running row on the device without looking, then append what
        each drew; rows that ended are retired, the others run on. Needs reserve_or_preempt() first."""
        self.running.sort(key=lambda s: -len(s.tokens))  # longest first for row_attention's chunks (CPU); stable
        rows, bs, device = self.running, self.block_size, self.device
        steps = min(RETIRE_EVERY, max(self.max_new_tokens - len(s.tokens) + s.n_prompt for s in rows))
        widest = max(len(s.blocks) for s in rows)
        positions = [len(s.tokens) - 1 for s in rows]
        tables = torch.tensor([s.blocks + [0] * (widest - len(s.blocks)) for s in rows], dtype=torch.int32)
        # a window may run past a row's blocks into block 0: widen the table to cover it
        tables = F.pad(tables, (0, max(0, -(-(max(positions) + steps) // bs) - widest)))
        tables = tables.to(device)
        if device.type not in fast_paths.FAST_PATH_DEVICES:  # no paged kernel (CPU): attend over copies of the rows
            self.cache.rows = self.row_copy(tables, max(positions) + steps)
        out = self.decode(torch.tensor([s.tokens[-1] for s in rows], device=device),
                          torch.tensor(positions, device=device), tables,
                          torch.tensor([s.seq_id for s in rows], device=device), steps).T.tolist()
        self.cache.rows = None
        self.stats["decode_steps"] += steps
        self.stats["rows"] += steps * len(rows)
        self.stats["peak_rows"] = max(self.stats["peak_rows"], len(rows))
        self.running = [seq for seq, drawn in zip(rows, out) if self.append(seq, drawn)]


@torch.no_grad()
def generate(model: Transformer, prompts: list, *, max_new_tokens: int, num_samples: int = 1,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, greedy: bool = False,
             seed: int = 0, prompt_ids: list | None = None, batch_size: int = 64, cache_tokens: int = 0,
             block_size: int = KV_BLOCK, eos_token_ids: list | None = None, progress: bool = True, on_finish=None,
             stats: dict | None = None) -> list:
    """Sample `num_samples` completions for each tokenized prompt; returns result[prompt][sample] = Completion.

    A paged engine: keys and values live in blocks of one pool (`cache_tokens` tokens), taken as sequences grow and
    returned as they end, so a row costs only what it has written. Up to `batch_size` sequences decode together;
    finished ones are retired every RETIRE_EVERY steps and their rows refilled from the queue at once. The samples of
    a prompt share its blocks: one prefill per prompt. When the pool runs dry the sequence that came last is
    preempted (its blocks freed, its tokens kept) and later resumed by one prefill of everything it has.
    Sample j of prompt i draws its random numbers from (seed, prompt_ids[i] * num_samples + j, position, token), so
    it does not depend on the batch, the blocks it lands in, preemption, or which rank generates it.
    `on_finish(prompt, sample, completion)` is called as each completion ends; `stats`, when given, receives the
    decode steps, mean and peak rows resident, preemptions, prefilled tokens, completion tokens and seconds.
    """
    from tqdm import tqdm
    cfg = model.config
    ids = list(range(len(prompts))) if prompt_ids is None else list(prompt_ids)
    if not prompts or any(len(p) == 0 for p in prompts) or len(ids) != len(prompts):
        raise SSDError("generate() needs at least one prompt, no empty prompt, and one prompt id per prompt")
    if max_new_tokens < 1 or num_samples < 1:
        raise SSDError(f"max_new_tokens ({max_new_tokens}) and num_samples ({num_samples}) must be >= 1")
    length = max(map(len, prompts)) + max_new_tokens
    if length > cfg.max_position_embeddings:
        raise SSDError(f"the longest prompt ({length - max_new_tokens} tokens) + {max_new_tokens} new tokens exceeds "
                       f"the model's max_position_embeddings ({cfg.max_position_embeddings})")
    if not greedy:
        try:
            check_sampling_args(temperature, top_k, top_p, min_p)
        except ValueError as e:
            raise SSDError(str(e)) from None

    def draw(logits, seq_ids, positions):
        if greedy:
            return logits.argmax(-1)
        return call_fast("fused_sampler", sample_next_token, sample_next_token_reference, logits, seed=seed,
                         temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seq_ids=seq_ids,
                         positions=positions)

    results = [[None] * num_samples for _ in prompts]

    def finish(seq: Sequence, completion: Completion):
        results[seq.prompt][seq.sample] = completion
        if on_finish is not None:
            on_finish(seq.prompt, seq.sample, completion)
        bar.update(1)
    eos = set(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
    engine = Engine(model, draw, rows=min(batch_size, len(prompts) * num_samples), length=length, finish=finish,
                    max_new_tokens=max_new_tokens, eos=eos, cache_tokens=cache_tokens, block_size=block_size)
    bar = tqdm(total=len(prompts) * num_samples, unit="completion", disable=not progress, dynamic_ncols=True)
    engine.queue.extend([Sequence(i, j, ids[i] * num_samples + j, i * num_samples + j, list(p), len(p))
                         for j in range(num_samples)] for i, p in enumerate(prompts))
    t0 = time.perf_counter()
    while engine.queue or engine.running:  # a pass with no row left running only admits: all ended at prefill
        engine.admit()
        engine.reserve_or_preempt()
        if engine.running:
            engine.decode_window()
            bar.set_postfix_str(f"{engine.stats['tokens'] / (time.perf_counter() - t0):.0f} tok/s, "
                                f"{len(engine.running)} rows", refresh=False)
    bar.close()
    if stats is not None:
        run = engine.stats
        stats.update(run, rows=run["rows"] / max(1, run["decode_steps"]), seconds=time.perf_counter() - t0)
    return results


def self_test(device, enabled: dict, model_path: str = "", sampling=()) -> dict:
    """The fast paths' startup self-test (ssd_kernels/fast_paths.py), before any weights load: set FAST_PATHS and
    return each one's status. The sampler also checks the run's (T, top-k, top-p, min-p) `sampling`, the paged kernel
    the model's head shape (else Qwen3-4B's). One that fails on any rank is off on every rank."""
    config = Path(model_path) / "config.json"
    mcfg = model_config_from_hf(json.loads(config.read_text())) if model_path and config.is_file() else None
    heads = (mcfg.num_heads, mcfg.num_kv_heads, mcfg.head_dim) if mcfg else (32, 8, 128)
    model_parts = MoE, document_attention, Documents
    checks = dict(fused_sampler=lambda: check_sampler(sample_next_token, device, extra=sampling),
                  paged_attention=lambda: check_paged_attention(paged_decode_attention, device, *heads, KV_BLOCK),
                  cuda_graphs=lambda: fast_paths.check_graphs(device, Transformer, model_config_from_hf, generate),
                  flash_varlen=lambda: fast_paths.check_varlen_and_grouped_mm(device, "flash_varlen", *model_parts),
                  grouped_mm=lambda: fast_paths.check_varlen_and_grouped_mm(device, "grouped_mm", *model_parts))
    try:
        return fast_paths.self_test(device, enabled, checks)
    except fast_paths.CudaContextBroken as e:
        raise SSDError(str(e)) from None


# ---------------------------------------------------------------- SSD data phase --------------------------------------

# How the paper's authors sampled: the problem as plain text behind a short instruction, no chat template.
RAW_INSTRUCTION = ("Solve the following programming problem in Python. Answer with only the complete program in a "
                   "single ```python code block, without any explanation.\n\n")
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SAMPLE_FIELDS = ("prompt_index", "sample_index", "prompt", "completion", "prompt_ids", "completion_ids",
                 "prompt_tokens", "completion_tokens", "stop", "prompt_cut", "keep", "drop_reason")


def load_prompts(cfg: Config) -> list:
    """The prompt column (strings or chat message lists) of a hub dataset or a local file/folder; empty prompts become
    None, so prompt indices stay the dataset's row indices."""
    path = Path(cfg.dataset_path)
    if cfg.dataset_path and not path.is_dir() and path.suffix not in LOCAL_FORMATS:
        raise SSDError(f"--dataset_path {path}: expected a {'/'.join(LOCAL_FORMATS)} file or a save_to_disk folder")
    if cfg.dataset_path and not path.exists():
        raise SSDError(f"--dataset_path {path} does not exist")
    if path.suffix == ".jsonl" and path.is_file():  # the json module: `datasets` and pyarrow cost 110 MiB and 1 s
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except ValueError:
            rows = None
        if not rows or not all(isinstance(r, dict) for r in rows):
            raise SSDError(f"cannot read --dataset_path {path}: is it empty or malformed (one JSON object a line)?")
        columns = list(dict.fromkeys(k for r in rows for k in r))
        return check_prompts(columns, lambda: [r.get(cfg.prompt_column) for r in rows], cfg)
    import datasets
    datasets.disable_progress_bars()
    if cfg.dataset_path:
        try:
            ds = datasets.load_from_disk(str(path)) if path.is_dir() else \
                datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
        except Exception as e:  # empty or malformed files: datasets raises a variety of errors
            raise SSDError(f"cannot read --dataset_path {path} ({type(e).__name__}): is it empty or malformed?") \
                from None
        if isinstance(ds, datasets.DatasetDict):
            if cfg.dataset_split not in ds:
                raise SSDError(f"{path} has splits {list(ds)}, not {cfg.dataset_split!r}; pass --dataset_split")
            ds = ds[cfg.dataset_split]
    else:
        try:
            ds = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config or None, split=cfg.dataset_split)
        except Exception as e:  # offline, unknown name or config: one line naming what to check
            raise SSDError(f"cannot load dataset {cfg.dataset_name!r} (config {cfg.dataset_config!r}, split "
                           f"{cfg.dataset_split!r}): {type(e).__name__}; check the names and the network, or "
                           "pass a local file with --dataset_path") from None
    return check_prompts(ds.column_names, lambda: ds[cfg.prompt_column], cfg)


def check_prompts(columns: list, read_column, cfg: Config) -> list:
    """The first --max_prompts of the column read_column() reads, empty prompts as None; refused if none is left."""
    if cfg.prompt_column not in columns:
        raise SSDError(f"the dataset has no column {cfg.prompt_column!r}; its columns are {columns}; "
                       "pass --prompt_column")
    prompts = [p if isinstance(p, str) and p.strip() or isinstance(p, list) and p else None
               for p in read_column()[: cfg.max_prompts or None]]
    if not any(prompts):
        raise SSDError(f"no non-empty prompt in column {cfg.prompt_column!r} ({len(prompts)} rows); "
                       "check --dataset_path/--dataset_name and --prompt_column")
    return prompts


def format_prompt(prompt, tokenizer, cfg: Config) -> tuple:
    """(token ids, whether cut): cut from the left to --max_prompt_length so the generation prompt survives."""
    if cfg.prompt_format == "chat":
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             **json.loads(cfg.chat_template_kwargs))
        ids = tokenizer(text, add_special_tokens=False).input_ids  # the template already has any BOS
    else:
        text = prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in prompt)
        ids = tokenizer(RAW_INSTRUCTION + text).input_ids
    return ids[-cfg.max_prompt_length:], len(ids) > cfg.max_prompt_length


def is_stub(completion: str) -> bool:
    """An empty completion, or a single line shorter than 10 characters, after stripping: nothing to learn from."""
    text = completion.strip()
    return not text or ("\n" not in text and len(text) < 10)


def apply_filters(records: list, cfg: Config) -> list:
    """Set `keep` / `drop_reason` on every record from scratch, so the result depends only on the completions."""
    for r in records:
        stub = cfg.filter_empty and is_stub(r["completion"])
        cut = cfg.drop_truncated and r["stop"] == "length"
        r["keep"], r["drop_reason"] = not (stub or cut), "stub" if stub else "truncated" if cut else None
    if cfg.drop_shortest > 0:  # the authors' code also dropped the shortest 10% of responses by characters
        kept = sorted((r for r in records if r["keep"]), key=lambda r: len(r["completion"]))
        for r in kept[: int(len(kept) * cfg.drop_shortest)]:
            r["keep"], r["drop_reason"] = False, "shortest"
    return records


def read_jsonl(path: Path) -> list:
    """Records of a JSONL file, ignoring a last line cut short by a crash (every complete line ends in a newline)."""
    lines = path.read_text().split("\n") if path.exists() else []
    return [json.loads(line) for line in lines[:-1] if line]


def check_context(longest_prompt: int, model_dir: Path, cfg: Config, device):
    """Stop before sampling (and before the weights load) when a completion could run past the model's context or
    a --cache_tokens pool could not hold one whole sequence; every rank reaches the same verdict."""
    longest = torch.tensor(longest_prompt, device=device)
    if dist.is_initialized():
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    limit = model_config_from_hf(json.loads((model_dir / "config.json").read_text())).max_position_embeddings
    longest, new = int(longest), cfg.max_completion_length
    if longest + new > limit:
        raise SSDError(f"the longest prompt ({longest} tokens) + --max_completion_length ({new}) exceeds the model's "
                       f"max_position_embeddings ({limit}); lower --max_completion_length or --max_prompt_length")
    blocks = -(-(longest + new) // KV_BLOCK)
    if cfg.cache_tokens and cfg.cache_tokens // KV_BLOCK < blocks:
        raise SSDError(f"--cache_tokens {cfg.cache_tokens} holds no sequence of {longest} prompt + {new} new tokens "
                       f"({blocks} blocks of {KV_BLOCK}); raise --cache_tokens to at least {blocks * KV_BLOCK}")


def sample_phase(cfg: Config, prompts: list, model_path: str, work: Path, rank: int, world: int, device, seed: int):
    """Sample every prompt's completions with `seed` and write samples.jsonl. Resumable."""
    from transformers import AutoTokenizer
    final = work / "samples.jsonl"
    if final.exists():
        return
    model_dir = resolve_model_dir(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    mine = [i for i in range(rank, len(prompts), world) if prompts[i] is not None]  # strided shares balance lengths
    ids, cut = {}, {}
    for i in mine:
        ids[i], cut[i] = format_prompt(prompts[i], tokenizer, cfg)
    check_context(max(map(len, ids.values()), default=0), model_dir, cfg, device)  # before the weights load
    model, _ = load_model(model_dir, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    end_phase("sample: load", device)
    parts = [work / f"samples-part{w}-of-{world}.jsonl" for w in range(world)]
    part, done = parts[rank], read_jsonl(parts[rank])
    with open(part, "w") as f:  # rewrite what survived a crash, without any half-written last line
        f.writelines(json.dumps(r) + "\n" for r in done)
    seen = {(r["prompt_index"], r["sample_index"]) for r in done}
    todo = [i for i in mine if any((i, j) not in seen for j in range(cfg.num_samples))]
    if todo:
        print(f"[rank {rank}] sampling {len(todo)} prompts x {cfg.num_samples} ({len(mine) - len(todo)} done)")
        with open(part, "a") as f:
            def write(k, j, c: Completion):
                i = todo[k]
                if (i, j) in seen:
                    return
                f.write(json.dumps({"prompt_index": i, "sample_index": j, "prompt": tokenizer.decode(ids[i]),
                                    "completion": tokenizer.decode(c.tokens, skip_special_tokens=True),
                                    "prompt_ids": ids[i], "completion_ids": c.tokens, "prompt_tokens": len(ids[i]),
                                    "completion_tokens": len(c.tokens), "stop": c.stop, "prompt_cut": cut[i],
                                    "keep": None, "drop_reason": None}) + "\n")
                f.flush()
            generate(model, [ids[i] for i in todo], max_new_tokens=cfg.max_completion_length,
                     num_samples=cfg.num_samples, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                     min_p=cfg.min_p, seed=seed, prompt_ids=todo, batch_size=cfg.generation_batch_size,
                     cache_tokens=cfg.cache_tokens, progress=rank == 0, on_finish=write)
    del model
    gc.collect()  # what a cycle holds of the model and KV pool goes now (a first import in load_model can hold it)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand the sampling weights and KV cache back before training loads fp32 weights
    barrier(long_wait=True)  # the other ranks may still be sampling
    if rank == 0:
        records = [r for p in parts for r in read_jsonl(p)]
        records = apply_filters(sorted(records, key=lambda r: (r["prompt_index"], r["sample_index"])), cfg)
        tmp = final.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({k: r[k] for k in SAMPLE_FIELDS}) + "\n" for r in records))
        os.replace(tmp, final)
        for p in parts:
            p.unlink()
        report_samples(records, sum(p is None for p in prompts))
    barrier(long_wait=True)  # rank 0 merges and filters every rank's samples


def training_sequences(path: Path) -> tuple:
    """(kept sequences as (int32 prompt + completion ids, prompt length), number of samples), read line by line:
    token ids as Python ints cost ~36 bytes each, and long completions add up to billions of tokens."""
    seqs, total = [], 0
    with open(path) as f:
        for line in f:
            r, total = json.loads(line), total + 1
            if r["keep"]:
                seqs.append((torch.tensor(r["prompt_ids"] + r["completion_ids"], dtype=torch.int32),
                             r["prompt_tokens"]))
    return seqs, total


def report_samples(records: list, empty_prompts: int):
    kept = [r for r in records if r["keep"]]
    drops = {k: sum(r["drop_reason"] == k for r in records) for k in ("stub", "truncated", "shortest")}
    lengths = sorted(r["completion_tokens"] for r in records)
    cut = len({r["prompt_index"] for r in records if r["prompt_cut"]})
    print(f"samples: {len(records)} | kept {len(kept)} | dropped {drops['stub']} stub + {drops['truncated']} "
          f"truncated + {drops['shortest']} shortest | {cut} prompts cut from the left | {empty_prompts} empty "
          "prompts skipped")
    print(f"completion tokens: mean {sum(lengths) / len(lengths):.0f}, median {lengths[len(lengths) // 2]}, "
          f"min {lengths[0]}, max {lengths[-1]}")

    def capped_share(rs):  # a token-mean loss weighs samples by length: runaway samples can carry most of it
        tokens = sum(r["completion_tokens"] for r in rs)
        return 100 * sum(r["completion_tokens"] for r in rs if r["stop"] == "length") / max(1, tokens)
    print(f"length-capped (no end token): {sum(r['stop'] == 'length' for r in records)} samples, "
          f"{capped_share(records):.1f}% of all completion tokens, {capped_share(kept):.1f}% of the kept ones "
          "(--drop_truncated drops them)")


# ---------------------------------------------------------------- training --------------------------------------------

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 peaks, for MFU


def lr_at(step: int, total: int, cfg: Config) -> float:
    """Linear warmup to the peak, then cosine decay to learning_rate * min_lr_ratio (step counts from 0)."""
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    low = cfg.learning_rate * cfg.min_lr_ratio
    return low + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - low)


@torch.no_grad()
def adamw_step(params, grads, exp_avg, exp_avg_sq, step: int, lr: float, cfg: Config):
    """One AdamW update as torch.optim.AdamW computes it: decoupled weight decay, bias-corrected moments.

    `step` counts from 1. Every tensor is a plain (local-shard) fp32 tensor. Weight decay shrinks the weight matrices
    and the embedding only: norm scales and biases (the 1-D tensors; a shard keeps its tensor's rank) are not decayed
    towards 0, as in torchtitan and the usual no-decay parameter group.
    """
    b1, b2 = cfg.adam_beta1, cfg.adam_beta2
    bias1, bias2_sqrt = 1 - b1 ** step, math.sqrt(1 - b2 ** step)
    for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq):
        if p.ndim >= 2:
            p.mul_(1 - lr * cfg.weight_decay)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        p.addcdiv_(m, (v.sqrt() / bias2_sqrt).add_(cfg.adam_epsilon), value=-lr / bias1)


def clip_grad_norm(grads, max_norm: float) -> float:
    """Scale the gradient so its global L2 norm (over every rank's shard) is at most max_norm; returns the norm."""
    sq = torch.nn.utils.get_total_norm(grads) ** 2  # a foreach norm: no squared copy of each gradient
    if dist.is_initialized():
        dist.all_reduce(sq)
    norm = sq.sqrt().item()
    if max_norm > 0 and norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm


def step_microbatches(lengths: list, step: int, cfg: Config, world: int) -> list:
    """For optimizer step `step`: each rank's micro-batches, as lists of sequence indices.

    The step's global batch is the next per_device x accumulation x world sequences of a stream of seeded per-epoch
    permutations (so data order follows from the step number alone). It is sorted by length and dealt to the ranks
    in turn, and each rank packs its share, longest first, into the first micro-batch with room for it under
    max_tokens_per_microbatch (first-fit decreasing; a longer sequence gets a micro-batch of its own).
    """
    n, size = len(lengths), cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    perms = {e: torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + e)).tolist()
             for e in range(step * size // n, ((step + 1) * size - 1) // n + 1)}  # the epochs this step reaches
    batch = sorted((perms[k // n][k % n] for k in range(step * size, (step + 1) * size)),
                   key=lambda i: (-lengths[i], i))
    plan = []
    for rank in range(world):
        micro, room = [], []
        for i in batch[rank::world]:
            fits = next((m for m in range(len(micro)) if room[m] >= lengths[i]), None)
            if fits is None:
                micro.append([]), room.append(cfg.max_tokens_per_microbatch)
                fits = len(micro) - 1
            micro[fits].append(i)
            room[fits] -= lengths[i]
        plan.append(micro)
    return plan


def pack(seqs: list, device) -> tuple:
    """One row of (ids, prompt length) sequences end to end: input ids, positions restarting at each sequence,
    targets (-100 on the prompts and on each sequence's last position) and the Documents that keep them apart."""
    ids = torch.cat([torch.as_tensor(s, dtype=torch.long) for s, _ in seqs])
    lens = torch.tensor([len(s) for s, _ in seqs])
    starts = lens.cumsum(0) - lens
    positions = torch.arange(len(ids)) - starts.repeat_interleave(lens)
    targets = torch.full_like(ids, -100)
    for (s, n_prompt), start in zip(seqs, starts.tolist()):  # position t predicts token t + 1 of its own sequence
        targets[start + n_prompt - 1:start + len(s) - 1] = ids[start + n_prompt:start + len(s)]
    docs = Documents(F.pad(lens.cumsum(0), (1, 0)).to(device, torch.int32), lens.tolist())
    return ids[None].to(device), positions[None].to(device), targets[None].to(device), docs


def shard_model(model: Transformer, cfg: Config, device):
    """FSDP2 as torchtitan does it: one group per block, then the root (embedding, final norm and the tied head).

    On CUDA with --bf16, compute runs in bf16 on fp32 master weights and gradients are reduced in fp32.
    The loss is already a mean over the step's tokens on every rank, so FSDP must sum gradients, not average them
    (one rank already sums: a divide factor of 1 would still cost a pass over every gradient). One rank without
    mixed precision has nothing to shard or cast: its model stays plain (FSDP would add copies, hooks and, through
    torch._dynamo, ~1 s of imports).
    """
    bf16 = cfg.bf16 and device.type == "cuda"
    if dist.get_world_size() == 1 and not bf16:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for module in (*model.model.layers, model):
        fully_shard(module, mp_policy=mp)
        if dist.get_world_size() > 1:
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no pre-multiplied sum
    return model


def save_state(path: Path, state: dict, rank: int):
    """Write every rank's training state into a fresh folder, then swap it in: a kill never leaves a torn state."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    torch.save(state, tmp / f"rank{rank}.pt")
    barrier()
    if rank == 0:
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)  # a kill after the last swap's rename may have left it
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_state(path: Path, rank: int, world: int):
    """The last complete training state, or None (a kill between the two renames leaves it in `.old`)."""
    for p in (path, path.with_name(path.name + ".old")):
        if (p / f"rank{rank}.pt").exists():
            state = torch.load(p / f"rank{rank}.pt", weights_only=True)
            if state["world"] != world:
                raise SSDError(f"{p} was written by {state['world']} ranks; resume with --nproc_per_node="
                               f"{state['world']} or use a new --output_dir")
            return state
    return None


def peak_host_gb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def start_training(cfg: Config, model_path: str, state_dir: Path, rank: int, world: int, device, total: int) -> tuple:
    """(model, tokenizer, AdamW state, first step): the sharded fp32 model fresh from the checkpoint, or as the last
    training state left it, with that state's moments, step and RNG (each rank reads only its own slices)."""
    state = load_state(state_dir, rank, world)
    model, tokenizer = load_model(model_path, device, torch.float32, fill=state is None or cfg.lora_r > 0,
                                  shard=lambda m: shard_model(apply_lora(m, cfg, device), cfg, device))
    if cfg.lora_r:
        init_lora_(model, cfg.seed)
    model.checkpointing = cfg.gradient_checkpointing
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters; AdamW updates local shards
    opt = params, *([torch.zeros_like(local_shard(p)[0]) for p in params] for _ in "mv")  # and AdamW's two moments
    if state is None:
        return model, tokenizer, opt, 0
    with torch.no_grad():
        for dst, src in zip([local_shard(p)[0] for p in params] + opt[1] + opt[2],
                            state["params"] + state["exp_avg"] + state["exp_avg_sq"]):
            dst.copy_(src)
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state:  # LoRA dropout on CUDA draws from the device's generator
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    print(f"[rank {rank}] resuming training at step {state['step']} of {total}")
    return model, tokenizer, opt, state["step"]


def optimizer_step(model: Transformer, opt: tuple, seqs: list, plan: list, step: int, total: int, cfg: Config,
                   rank: int, device, state_dir: Path) -> tuple:
    """One optimizer step over every rank's micro-batches `plan`: forward and backward for a token-mean loss over all
    their completion tokens, then clipping and AdamW. Returns (loss, grad norm, lr)."""
    params, exp_avg, exp_avg_sq = opt
    n_targets = sum(len(seqs[i][0]) - seqs[i][1] for micro in plan for mb in micro for i in mb)  # all ranks' targets
    loss_sum = torch.zeros((), device=device)
    for k in range(max(len(micro) for micro in plan)):  # every rank runs as many passes: FSDP's collectives
        mine = plan[rank][k] if k < len(plan[rank]) else None
        inputs, positions, targets, docs = pack([seqs[i] for i in mine] if mine else [([0, 0], 1)], device)
        loss = model(inputs, positions, docs, targets=targets)
        (loss / n_targets * (1.0 if mine else 0.0)).backward()
        loss_sum += loss.detach() if mine else 0.0
    if dist.is_initialized():
        dist.all_reduce(loss_sum)
    step_loss = loss_sum.item() / n_targets
    grads = [local_shard(p.grad)[0] for p in params]
    grad_norm = clip_grad_norm(grads, cfg.max_grad_norm)
    if not math.isfinite(step_loss) or not math.isfinite(grad_norm):  # stop before the update spreads it
        raise SSDError(f"the loss ({step_loss}) or gradient norm ({grad_norm}) is not finite at step {step + 1}; "
                       f"the last good training state in {state_dir} is kept; lower --learning_rate")
    lr = lr_at(step, total, cfg)
    adamw_step([local_shard(p)[0] for p in params], grads, exp_avg, exp_avg_sq, step + 1, lr, cfg)
    for p in params:
        p.grad = None
    return step_loss, grad_norm, lr


def log_metrics(path: Path, row: dict, model: Transformer, lengths: list, seconds: float, world: int, device):
    """Append a metrics.jsonl row, with the peak host memory, and on CUDA the MFU of a step of sequences of these
    lengths in these seconds and the peak device memory."""
    row["peak_host_memory_gb"] = peak_host_gb()
    if device.type == "cuda":
        c, n_params, trained = model.config, 0, 0
        for name, p in model.named_parameters():  # an MoE token meets only experts_per_token of the stacked experts
            stacked = name.endswith((".gate_up_proj", ".down_proj"))
            n = p.numel() * (c.experts_per_token / c.num_experts if stacked else 1)
            n_params, trained = n_params + n, trained + n * p.requires_grad  # LoRA trains only the adapters
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(device)), None)
        # 6N per token (4N for frozen weights, which get no weight gradients: LoRA), plus attention's 12 L H Q T
        # per token of a sequence of T tokens: sum of T^2
        attn = 12 * c.num_layers * c.num_heads * c.head_dim * sum(n ** 2 for n in lengths)
        if peak:
            row["mfu"] = ((4 * n_params + 2 * trained) * sum(lengths) + attn) / seconds / (peak * world)
        row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def save_trained(model: Transformer, tokenizer, work: Path, rank: int, cfg: Config, model_path: str):
    """Gather the trained weights one tensor at a time (rank 0 holds the model once, in the checkpoint's dtype; LoRA
    adapters in fp32) and save them to `work`: the model, or with --lora_r the PEFT adapter (merged: --merge_lora)."""
    hf = model.config.hf_config
    dtype = getattr(torch, hf.get("torch_dtype") or hf.get("dtype") or "float32")
    full, adapter_only = {}, cfg.lora_r and not cfg.merge_lora and work == Path(cfg.output_dir)  # as save_lora
    for name, p in model.named_parameters():
        if adapter_only and ".lora_" not in name:
            continue  # the same on every rank: no collective is skipped by some only
        gathered = p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()  # save_lora merges in place
        if rank == 0:
            full[name] = gathered.to(device="cpu", dtype=torch.float32 if ".lora_" in name else dtype)
    if rank == 0:
        save_lora(model, tokenizer, work, full, cfg, model_path) if cfg.lora_r else \
            save_model(model, tokenizer, work, state_dict=full)


def train_phase(cfg: Config, model_path: str, seqs: list, work: Path, rank: int, world: int, device):
    """Fine-tune on (ids, prompt length) sequences with a token-mean cross-entropy, then save the model to `work`."""
    from tqdm import tqdm
    lengths = [len(ids) for ids, _ in seqs]
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * len(seqs) / per_step)
    state_dir, metrics_path = work / "train_state", work / "metrics.jsonl"
    model, tokenizer, opt, start = start_training(cfg, model_path, state_dir, rank, world, device, total)
    end_phase("train: load", device)
    if rank == 0 and metrics_path.exists():  # forget metrics logged after the state we resume from
        kept = [m for m in read_jsonl(metrics_path) if m["step"] <= start]
        metrics_path.write_text("".join(json.dumps(m) + "\n" for m in kept))
    bar = tqdm(range(start, total), initial=start, total=total, disable=rank != 0, dynamic_ncols=True, unit="step")
    for step in bar:
        t0 = time.perf_counter()
        plan = step_microbatches(lengths, step, cfg, world)
        loss, grad_norm, lr = optimizer_step(model, opt, seqs, plan, step, total, cfg, rank, device, state_dir)
        step_seqs = [i for micro in plan for mb in micro for i in mb]
        seconds, tokens = time.perf_counter() - t0, sum(lengths[i] for i in step_seqs)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds:.0f}", refresh=False)
        if rank == 0 and ((step + 1) % cfg.logging_steps == 0 or step + 1 == total):
            row = {"step": step + 1, "loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens": tokens,
                   "completion_tokens": sum(lengths[i] - seqs[i][1] for i in step_seqs),
                   "tokens_per_s": tokens / seconds, "micro_batches": len(plan[0])}
            log_metrics(metrics_path, row, model, [lengths[i] for i in step_seqs], seconds, world, device)
        if (step + 1) % cfg.save_steps == 0 and step + 1 < total:
            save_state(state_dir, {"step": step + 1, "world": world, "rng": torch.get_rng_state(),
                                   **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
                                   "params": [local_shard(p)[0].detach().clone() for p in opt[0]], "exp_avg": opt[1],
                                   "exp_avg_sq": opt[2]}, rank)
    bar.close()
    end_phase("train", device)
    save_trained(model, tokenizer, work, rank, cfg, model_path)
    if rank == 0:
        shutil.rmtree(state_dir, ignore_errors=True)
    del model, opt
    gc.collect()  # FSDP's hooks keep the model in reference cycles: free it before another round samples
    if device.type == "cuda":
        torch.cuda.empty_cache()
    barrier(long_wait=True)  # rank 0 writes the checkpoint (60 GB for a 30B model)


# ---------------------------------------------------------------- main ------------------------------------------------

RESUMABLE_CHANGES = {"output_dir", "logging_steps", "save_steps", "generation_batch_size", "cache_tokens",
                     "sample_only", "dist_timeout", "preflight", *FAST_PATHS}  # a resumed run may change these
WAIT_GROUP = [None]  # a gloo group whose barrier waits out the other ranks' sampling (hours, not --dist_timeout)
PHASES = []  # (name, end time, peak host MiB, peak CUDA MiB or None) of each phase this process ran, in order


def barrier(long_wait: bool = False):
    if dist.is_initialized():
        dist.barrier(group=WAIT_GROUP[0] if long_wait else None)


def start_phases():
    """Open a run's phase record: on the process's first run from its start (imports count, from /proc), else now."""
    age = 0.0
    if not PHASES:
        try:  # seconds since boot now, less at the process's start
            ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
            age = float(Path("/proc/uptime").read_text().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    PHASES[:] = [("", time.perf_counter() - age, 0.0, None)]


def end_phase(name: str, device):
    """Close the phase that ran since the previous one ended: record its end and the peak memory so far (the process's
    peaks are never reset, so what a parent measures stays true: a phase that raised the peak shows it)."""
    PHASES.append((name, time.perf_counter(), peak_host_gb() * 1024,
                   torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None))


def report_phases(rank: int, world: int):
    """One line per phase: wall seconds and peak memory so far (with several ranks, the largest over the ranks)."""
    every = [None] * world
    dist.all_gather_object(every, PHASES)
    if rank == 0:
        for k in range(1, min(map(len, every))):
            wall, host = max(p[k][1] - p[k - 1][1] for p in every), max(p[k][2] for p in every)
            cuda = "" if every[0][k][3] is None else f", CUDA {max(p[k][3] for p in every):,.0f} MiB"
            print(f"phase {every[0][k][0]:<12} {wall:7.2f} s, peak so far: host {host:,.0f} MiB{cuda}"
                  + (f" (largest of {world} ranks)" if world > 1 else ""))


def init_distributed(timeout_minutes: float = 30.0):
    """(rank, world, device): torchrun's process group (NCCL on GPU, gloo on CPU), or a group of one, so the same
    collectives run in one process. They give up after `timeout_minutes`: a dead or hung rank stops the others."""
    import datetime
    cuda = torch.cuda.is_available()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    alone = {} if "RANK" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes), **alone)
    WAIT_GROUP[0] = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=12)) if world > 1 else None
    return rank, world, device


def check_config(cfg: Config):
    """Reject bad settings in one line each, before any data or model is loaded."""
    checks = [
        (cfg.prompt_format in ("chat", "raw"), "--prompt_format must be chat or raw"),
        (0 <= cfg.drop_shortest < 1, "--drop_shortest must be a fraction in [0, 1)"),
        (cfg.max_prompts >= 0, "--max_prompts must be >= 0 (0 = all)"),
        (min(cfg.max_prompt_length, cfg.max_completion_length, cfg.num_samples, cfg.generation_batch_size,
             cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.logging_steps, cfg.save_steps,
             cfg.rounds, cfg.max_tokens_per_microbatch) > 0,
         "lengths, counts, batch sizes and step intervals must be positive"),
        (cfg.max_steps > 0 or cfg.num_train_epochs > 0, "set --max_steps > 0 or --num_train_epochs > 0"),
        (cfg.dist_timeout > 0, "--dist_timeout must be a positive number of minutes"),
        (cfg.lora_r >= 0 and cfg.lora_alpha > 0 and 0 <= cfg.lora_dropout < 1,
         "--lora_r must be >= 0 (0 = off), --lora_alpha > 0 and --lora_dropout in [0, 1)"),
        (cfg.lora_r or not cfg.merge_lora, "--merge_lora merges a LoRA adapter: set --lora_r > 0 too"),
    ]
    for ok, message in checks:
        if not ok:
            raise SSDError(message)
    if cfg.lora_r:  # whether the model takes the LoRA flags, built on the meta device, before anything is sampled
        with torch.device("meta"):
            apply_lora(Transformer(model_config_from_hf(json.loads(
                (resolve_model_dir(cfg.model_name_or_path) / "config.json").read_text()))), cfg)
    try:
        check_sampling_args(cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p)  # the sampler's own rules, once
    except ValueError as e:
        raise SSDError(f"{e} (--temperature, --top_k, --top_p, --min_p)") from None
    try:
        if not isinstance(json.loads(cfg.chat_template_kwargs), dict):
            raise ValueError
    except ValueError:
        raise SSDError(f"--chat_template_kwargs must be a JSON object, got {cfg.chat_template_kwargs!r}") from None


def claim_output_dir(cfg: Config, rank: int):
    """Record the run's settings in output_dir; a rerun must match them (it resumes) or pick a new directory."""
    out, problem = Path(cfg.output_dir), [None]
    record = out / "ssd_config.json"
    if rank == 0:
        mine = dataclasses.asdict(cfg)
        before = json.loads(record.read_text()) if record.exists() else None
        diff = [k for k in mine if k not in RESUMABLE_CHANGES and before and before.get(k) != mine[k]]
        started = out.exists() and any(p.name != record.name for p in out.iterdir())  # a run that wrote nothing
        if diff and started:  # yet (a bad flag stopped it) can be restarted with other settings
            problem[0] = (f"{out} holds a run with other settings (--{diff[0]} {before.get(diff[0])!r}, now "
                          f"{mine[diff[0]]!r}); repeat its command to resume it, or pass a new --output_dir")
        elif before is None and started:
            problem[0] = f"{out} is not empty and holds no ssd run; pass a new --output_dir"
        elif before is None or diff:
            out.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(mine, indent=2))
    dist.broadcast_object_list(problem)  # every rank stops with the same message, none hangs at a barrier
    if problem[0]:
        raise SSDError(problem[0])


def record_fast_paths(cfg: Config, rank: int):
    """Keep the fast paths' status in ssd_config.json (rank 0's, which the self-test made the same on every rank)."""
    record = Path(cfg.output_dir) / "ssd_config.json"
    before = json.loads(record.read_text()) if rank == 0 else {}
    if rank == 0 and before.get("fast_paths") != FAST_PATH_STATUS:  # a finished run's rerun rewrites nothing
        record.write_text(json.dumps(before | {"fast_paths": FAST_PATH_STATUS}, indent=2))


def run(cfg: Config):
    """sample -> filter -> train -> save, for each round; every phase resumes where a killed run stopped."""
    check_config(cfg)
    rank, world, device = init_distributed(cfg.dist_timeout)
    start_phases()
    try:
        run_rounds(cfg, rank, world, device)
        record_fast_paths(cfg, rank)  # with any path that fell back during the run
        report_phases(rank, world)
    except BaseException as e:
        if world == 1:  # with peers, just exit: torchrun stops them, while tearing the group down could hang on them
            dist.destroy_process_group()
        elif isinstance(e, dist.DistError) or type(e) is RuntimeError and ("gloo" in str(e) or "NCCL" in str(e)):
            raise SSDError(f"rank {rank} of {world}: a collective failed or timed out (--dist_timeout "
                           f"{cfg.dist_timeout} min): {str(e).strip().splitlines()[0][:300]}; another rank died or "
                           "hangs (see its log); rerun the same command to resume from the last saved state") from None
        raise
    barrier()  # tear the groups down together: a rank still in gloo when its peer's sockets close aborts
    dist.destroy_process_group()


def run_rounds(cfg: Config, rank: int, world: int, device):
    claim_output_dir(cfg, rank)
    status = self_test(device, {name: getattr(cfg, name) for name in FAST_PATHS}, cfg.model_name_or_path,
                       [(cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p)])  # before any weights load
    if rank == 0:
        print("fast paths: " + ", ".join(f"{name} {s}" for name, s in status.items()))
    record_fast_paths(cfg, rank)
    prompts = load_prompts(cfg)  # a bad dataset fails here, before any model is loaded
    end_phase("start", device)
    model_path = cfg.model_name_or_path
    for r in range(1, cfg.rounds + 1):
        first = len(PHASES)
        # Round r < rounds works in output_dir/round-r; the last round's model is the run's, in output_dir.
        work = Path(cfg.output_dir) if r == cfg.rounds else Path(cfg.output_dir) / f"round-{r}"
        work.mkdir(parents=True, exist_ok=True)
        if (work / "config.json").exists() or (work / "adapter_config.json").exists():
            print(f"round {r}: model already trained in {work}")
            if rank == 0:  # a kill between the final save and this cleanup leaves the state behind
                shutil.rmtree(work / "train_state", ignore_errors=True)
        else:
            # Round r draws from seed + (r - 1) * 2^32 (the hash takes 64 bits): round 1 is the plain --seed, and a
            # later round never replays an earlier round's random numbers.
            sample_phase(cfg, prompts, model_path, work, rank, world, device, cfg.seed + ((r - 1) << 32))
            end_phase("sample", device)
            if cfg.sample_only:
                if rank == 0:
                    print(f"samples written to {work / 'samples.jsonl'}")
                return
            seqs, total = training_sequences(work / "samples.jsonl")
            if not seqs:
                raise SSDError(f"the filter dropped all {total} samples in {work / 'samples.jsonl'}; "
                               "nothing to train on: check the prompts, --max_completion_length and the filters")
            train_phase(cfg, model_path, seqs, work, rank, world, device)
            end_phase("save", device)
        if cfg.rounds > 1:
            PHASES[first:] = [(f"{r}: {p[0]}",) + p[1:] for p in PHASES[first:]]
        model_path = str(work)
    if rank == 0:
        print(f"done: the SSD model is in {cfg.output_dir}")


def main(argv=None):
    cfg = parse_args(argv)
    try:
        if cfg.preflight:  # bench/preflight.py, with this command line's flags
            if not torch.cuda.is_available():
                raise SSDError("--preflight checks a GPU machine, and this one has no CUDA device")
            import runpy
            sys.modules.setdefault("ssd", sys.modules[__name__])  # its `import ssd` is this module, not a 2nd copy
            sys.exit(runpy.run_path(str(Path(__file__).resolve().parent / "bench" / "preflight.py"))["main"](cfg))
        run(cfg)
    except SSDError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
