"""Chunked label log-probs from hidden states: the [N, V] logits never exist.

    logits_c = hidden_c @ weight.T                       [C, V] for one chunk of C tokens
    logp[i]  = logits_c[i, y_i] - logsumexp(logits_c[i])  (forward)
    dlogits  = g_i * (onehot(y_i) - softmax(logits_c[i])) (backward, recomputed per chunk)
    dhidden_c = dlogits @ weight,   dweight += dlogits.T @ hidden_c

The plain twin is `logprobs_from_hidden_reference` (`hidden @ weight.T`,
`log_softmax`, `gather`), which holds the full logits, the full log-softmax and
then the full gradient of the logits — several N x V x 4 bytes (1.2 GB for
N=2,048 tokens and SmolLM2's V=49,152). Here the peak extra memory is a few
chunks of logits, C x V x 4 bytes each, and the price is one more matmul: the
backward recomputes every chunk's logits (4 lm_head-sized matmuls instead of 3).

Precision: the lm_head matmul runs in the input dtype (GEMMs accumulate in
fp32 internally); logsumexp, softmax and the weight gradient are fp32 (fp64
for fp64 inputs, for gradcheck). Gradients are returned in the input dtype. Under autocast (`--dtype bf16`) the
lm_head matmuls run in bf16 in the forward and again in the backward (the
autocast state is saved and restored), so the recomputed logits are the same
ones whose logsumexp the forward kept.
Because the gradient of `weight` is returned through autograd, a weight that is
also used elsewhere (tied input embeddings) accumulates both contributions.
"""

import torch

IGNORE_INDEX = -100  # the label of a position that is not trained (as PyTorch's cross_entropy default)
CHUNK_BYTES = 64 * 2**20  # fp32 logits per chunk: tens of MB, far below N x V
MIN_CHUNK = 256  # fewer rows make the CPU lm_head matmul up to 2x slower per token


def default_chunk_size(vocab_size):
    """Tokens per chunk: one chunk of fp32 logits ~CHUNK_BYTES, at least MIN_CHUNK rows.

    SmolLM2 (V=49,152): 341 tokens, 64 MiB. Llama 3 (V=128,256): 256 tokens, 125 MiB.
    """
    return max(MIN_CHUNK, CHUNK_BYTES // (4 * vocab_size))


def acc_dtype(dtype):
    """The dtype sums are taken in: fp64 stays fp64 (so gradcheck can run), everything else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_logits(hidden_c, weight, acc):
    """[C, H] @ [V, H].T -> [C, V] in the accumulation dtype."""
    return (hidden_c @ weight.T).to(acc)


class ChunkedLogprobs(torch.autograd.Function):
    """Forward keeps only hidden, weight, labels and the per-token logsumexp [N]."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size):
        N = hidden.shape[0]
        acc = acc_dtype(hidden.dtype)
        ignored = labels == ignore_index
        # ignored rows gather column 0 (always in range) and are zeroed afterwards
        safe_labels = labels.masked_fill(ignored, 0)
        out = torch.empty(N, dtype=acc, device=hidden.device)
        lse = torch.empty(N, dtype=acc, device=hidden.device)
        for start in range(0, N, chunk_size):
            rows = slice(start, start + chunk_size)
            logits = _chunk_logits(hidden[rows], weight, acc)  # [C, V]
            lse[rows] = torch.logsumexp(logits, dim=-1)
            out[rows] = logits.gather(1, safe_labels[rows, None]).squeeze(1) - lse[rows]
            del logits
        out.masked_fill_(ignored, 0.0)
        ctx.save_for_backward(hidden, weight, safe_labels, ignored, lse)
        ctx.chunk_size = chunk_size
        device = hidden.device.type
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, safe_labels, ignored, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        acc = lse.dtype
        # [N]: ignored tokens contribute nothing
        g = grad_out.to(acc).masked_fill(ignored, 0.0)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        enabled, autocast_dtype = ctx.autocast
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            h = hidden[rows]
            with torch.autocast(hidden.device.type, dtype=autocast_dtype, enabled=enabled):
                # recompute this chunk's logits and turn them into dlogits in place:
                # [C, V] logits -> softmax -> -g * softmax, then +g at each label
                dlogits = _chunk_logits(h, weight, acc)
                dlogits.sub_(lse[rows, None]).exp_().mul_(-g[rows, None])
                dlogits.scatter_add_(1, safe_labels[rows, None], g[rows, None])
                if need_hidden:
                    grad_hidden[rows] = dlogits.to(weight.dtype) @ weight  # [C, V] @ [V, H]
                if need_weight:  # [V, C] @ [C, H], summed into the fp32 gradient
                    if enabled:  # the product in autocast's dtype, as the forward did
                        grad_weight += dlogits.T @ h
                    else:  # in place: no [V, H] temporary
                        grad_weight.addmm_(dlogits.T, h.to(acc))
            del dlogits
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def logprobs_from_hidden_chunked(hidden, weight, labels, ignore_index=IGNORE_INDEX,
                                 chunk_size=None):
    """Label log-probs from final hidden states, chunk by chunk of tokens.

    Args:
        hidden: [N, H] final hidden states (after the final norm).
        weight: [V, H] lm_head weight (may be tied to the input embedding).
        labels: [N] int64 token ids; `ignore_index` rows give 0 and no gradient.
        chunk_size: tokens per chunk; default `default_chunk_size(V)` (~64 MiB of logits).
    Returns:
        [N] log p(labels[i] | hidden[i]) in fp32 (fp64 for fp64 inputs).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [N]={tuple(hidden.shape[:1])}, got {tuple(labels.shape)}")
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return ChunkedLogprobs.apply(hidden, weight, labels.long(), ignore_index, int(chunk_size))


def logprobs_from_hidden_reference(hidden, weight, labels, ignore_index=IGNORE_INDEX):
    """Plain twin: hidden @ weight.T, log_softmax, gather. [N, H], [V, H], [N] -> [N]."""
    acc = acc_dtype(hidden.dtype)
    ignored = labels == ignore_index
    logp = (hidden @ weight.T).to(acc).log_softmax(-1)  # [N, V]
    picked = logp.gather(-1, labels.masked_fill(ignored, 0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(ignored, 0.0)
