"""ssd's kernels: `sample_next_token` (Triton on CUDA, torch reference elsewhere) and the reference pieces.

Not named `kernels`: that is Hugging Face's PyPI package, which transformers imports, and a folder of that name at the
repository root would shadow it.
"""

from .sampling import (
    check_sampling_args,
    filter_logits,
    portable_log,
    race_keys,
    row_keys,
    sample_next_token,
    sample_next_token_reference,
    token_uniform,
)

__all__ = ["check_sampling_args", "filter_logits", "portable_log", "race_keys", "row_keys", "sample_next_token",
           "sample_next_token_reference", "token_uniform"]
