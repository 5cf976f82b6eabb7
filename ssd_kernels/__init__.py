"""ssd's kernels: `sample_next_token` and paged decode attention (Triton on CUDA, torch reference elsewhere), and
`cuda_graphs` (decode steps replayed as CUDA graphs, beside the eager loop), and `fast_paths`: which CUDA-only paths
are in use, their startup self-test and their fall-back to the references.

Not named `kernels`: that is Hugging Face's PyPI package, which transformers imports, and a folder of that name at the
repository root would shadow it.
"""

from .paged_attention import (
    check_paged_attention,
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_decode_attention_triton,
)
from .sampling import (
    check_sampler,
    check_sampling_args,
    filter_logits,
    portable_log,
    race_keys,
    row_keys,
    sample_next_token,
    sample_next_token_reference,
    token_uniform,
)

__all__ = ["check_paged_attention", "check_sampler", "check_sampling_args", "filter_logits", "paged_decode_attention",
           "paged_decode_attention_reference", "paged_decode_attention_triton", "portable_log", "race_keys", "row_keys",
           "sample_next_token", "sample_next_token_reference", "token_uniform"]
