"""Fast paths for label log-probs, each beside its plain PyTorch twin.

- logprobs_chunked: from hidden states, chunk by chunk; the [N, V] logits never
  exist (CPU and GPU). Imported here.
- logprobs_triton: fused log-softmax + gather over logits [N, V]. Not imported
  here, because triton is optional: `from kernels.logprobs_triton import ...`
  only where impl="triton" is asked for (see losses.token_logps_from_hidden).
"""

from kernels.logprobs_chunked import (default_chunk_size, logprobs_from_hidden_chunked,
                                      logprobs_from_hidden_reference)

__all__ = ["default_chunk_size", "logprobs_from_hidden_chunked", "logprobs_from_hidden_reference"]
