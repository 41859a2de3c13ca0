"""Fused log-softmax + gather in Triton: label log-probs from logits [N, V].

    m_i = max_v logits[i, v],   log s_i = log sum_v exp(logits[i, v] - m_i)
    logp[i] = (logits[i, y_i] - m_i) - log s_i                        (forward)
    dlogits[i, v] = g_i * (1[v == y_i] - exp(logits[i, v] - m_i - log s_i))   (backward)

The plain PyTorch twin is `logprobs_reference`:
`logits.float().log_softmax(-1).gather(-1, labels)`. That twin writes a second
[N, V] tensor (the log-softmax) and keeps it for backward; this kernel reads
the logits once per pass and keeps only m and log s, [N] each. (They are
kept apart rather than added into the logsumexp: with logits near 1e4,
x - logsumexp cancels fp32 digits that (x - m) - log s keeps.)

Design
- One program per row. The row is read in blocks of BLOCK columns with an
  online max / sum-exp (the running sum is rescaled whenever the max grows),
  so V can be 128,256 or more while a program only ever holds BLOCK values.
- Arithmetic is in fp32 for bf16/fp16/fp32 inputs and in fp64 for fp64
  inputs (so `torch.autograd.gradcheck` works under the interpreter).
- Rows whose label is `ignore_index` (-100) give 0 and a zero gradient; their
  label is never used as an address.
- Backward writes grad_out * (onehot - softmax) straight into the gradient
  buffer from the saved m and log s; the log-softmax is never materialised.

On a CPU the kernel runs through the Triton interpreter (TRITON_INTERPRET=1
set before triton is imported): slow, used only by the tests. Its one
difference from a GPU: it converts fp32 -> bf16 by truncation, not rounding.

Benchmarking on a GPU (`python kernels/logprobs_triton.py` does this when CUDA
exists). With s bytes per logit (2 for bf16), the floor for the forward is
reading the logits once,

    bytes_floor = N * V * s        (+ O(N): labels, output, saved m and log s)

and the backward reads them once and writes the gradient once, 2 * N * V * s.
Report achieved bandwidth = bytes / seconds and compare it with the device's
peak (e.g. ~3.3 TB/s on an H100 SXM); a good kernel reaches 70-90 % of it.
The twin moves at least 3 * N * V * s' bytes in its forward (read logits,
write and re-read the fp32 log-softmax, s' = 4).
"""

import torch
import triton
import triton.language as tl

from kernels.logprobs_chunked import IGNORE_INDEX, acc_dtype


@triton.jit
def _logprobs_fwd_kernel(logits_ptr, labels_ptr, out_ptr, max_ptr, logsum_ptr, V, stride_row,
                         ignore_index, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK)

    # the first block is peeled so the running max starts finite (no -inf - -inf)
    x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(ACC)
    m = tl.max(x, 0)
    s = tl.sum(tl.exp(x - m), 0)
    for start in range(BLOCK, V, BLOCK):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(x, 0))
        # rescale the old sum to the new max, then add this block
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    # lse = m + log(s); kept apart so that x - lse does not cancel for huge logits
    log_s = tl.log(s)

    label = tl.load(labels_ptr + row)
    ignored = label == ignore_index
    # an ignored row reads column 0 instead of an out-of-range address
    x_label = tl.load(row_ptr + tl.where(ignored, 0, label)).to(ACC)
    tl.store(out_ptr + row, tl.where(ignored, 0.0, (x_label - m) - log_s))
    tl.store(max_ptr + row, m)
    tl.store(logsum_ptr + row, log_s)


@triton.jit
def _logprobs_bwd_kernel(logits_ptr, labels_ptr, grad_out_ptr, max_ptr, logsum_ptr, grad_ptr, V,
                         stride_row, grad_stride_row, ignore_index,
                         BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    grad_row_ptr = grad_ptr + row * grad_stride_row
    offs = tl.arange(0, BLOCK)

    label = tl.load(labels_ptr + row)
    m = tl.load(max_ptr + row)
    log_s = tl.load(logsum_ptr + row)
    g = tl.load(grad_out_ptr + row).to(ACC)
    g = tl.where(label == ignore_index, 0.0, g)
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(ACC)
        onehot = tl.where(cols == label, 1.0, 0.0)
        grad = g * (onehot - tl.exp((x - m) - log_s))
        tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _acc_dtypes(dtype):
    """(torch, triton) accumulation dtypes (kernels.logprobs_chunked.acc_dtype)."""
    acc = acc_dtype(dtype)
    return acc, tl.float64 if acc == torch.float64 else tl.float32


class FusedLogprobs(torch.autograd.Function):
    """autograd wrapper: forward saves logits, labels and the row max and
    log-sum-exp [N] each; backward launches `_logprobs_bwd_kernel`."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, block_size):
        logits = logits.contiguous()
        labels = labels.contiguous()
        N, V = logits.shape
        acc_torch, acc_tl = _acc_dtypes(logits.dtype)
        out = torch.empty(N, dtype=acc_torch, device=logits.device)
        row_max = torch.empty(N, dtype=acc_torch, device=logits.device)
        log_sum = torch.empty(N, dtype=acc_torch, device=logits.device)
        if N > 0:
            _logprobs_fwd_kernel[(N,)](logits, labels, out, row_max, log_sum, V, logits.stride(0),
                                       ignore_index, BLOCK=block_size, ACC=acc_tl)
        ctx.save_for_backward(logits, labels, row_max, log_sum)
        ctx.ignore_index, ctx.block_size, ctx.acc_tl = ignore_index, block_size, acc_tl
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels, row_max, log_sum = ctx.saved_tensors
        N, V = logits.shape
        grad_logits = torch.empty_like(logits)
        if N > 0:
            _logprobs_bwd_kernel[(N,)](logits, labels, grad_out.contiguous(), row_max, log_sum,
                                       grad_logits, V, logits.stride(0),
                                       grad_logits.stride(0), ctx.ignore_index,
                                       BLOCK=ctx.block_size, ACC=ctx.acc_tl)
        return grad_logits, None, None, None


def logprobs_triton(logits, labels, ignore_index=IGNORE_INDEX, block_size=None):
    """Label log-probs from logits with the fused Triton kernel.

    Args:
        logits: [N, V] float (bf16 / fp16 / fp32 / fp64), any device Triton runs on.
        labels: [N] int64 token ids in [0, V), or `ignore_index` for rows that give 0.
        block_size: columns per block (power of 2); default min(4096, next_pow2(V)).
    Returns:
        [N] log p(labels[i] | row i): fp32 (fp64 for fp64 logits).
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [N, V] and labels [N], got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    if block_size is None:
        block_size = min(4096, triton.next_power_of_2(logits.shape[1]))
    return FusedLogprobs.apply(logits, labels.long(), ignore_index, block_size)


def logprobs_reference(logits, labels, ignore_index=IGNORE_INDEX):
    """Plain PyTorch twin of `logprobs_triton`: [N, V], [N] -> [N] (fp32 or fp64)."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    ignored = labels == ignore_index
    logp = logits.to(acc).log_softmax(-1)
    # [N, V] -> [N]: the log-prob of each label; ignored rows gather column 0, then zero
    picked = logp.gather(-1, labels.masked_fill(ignored, 0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(ignored, 0.0)


def _benchmark(N=8192, V=128256, dtype=torch.bfloat16, iters=20):
    """Achieved bandwidth against the read-the-logits-once floor (CUDA only)."""
    logits = torch.randn(N, V, device="cuda", dtype=dtype, requires_grad=True)
    labels = torch.randint(0, V, (N,), device="cuda")
    s = logits.element_size()
    for name, fn in [("triton", logprobs_triton), ("twin", logprobs_reference)]:
        for _ in range(3):
            fn(logits, labels).sum().backward()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            out = fn(logits, labels)
        end.record()
        torch.cuda.synchronize()
        fwd = start.elapsed_time(end) / iters / 1e3
        start.record()
        for _ in range(iters):
            torch.autograd.grad(out.sum(), logits, retain_graph=True)
        end.record()
        torch.cuda.synchronize()
        bwd = start.elapsed_time(end) / iters / 1e3
        floor = N * V * s
        print(f"{name:7s} fwd {fwd * 1e3:7.3f} ms  {floor / fwd / 1e9:7.1f} GB/s (floor bytes / time)  |  "
              f"bwd {bwd * 1e3:7.3f} ms  {2 * floor / bwd / 1e9:7.1f} GB/s (read+write)")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("the bandwidth benchmark needs a CUDA GPU; on CPU run the tests "
                         "(tests/test_kernels.py) which use TRITON_INTERPRET=1")
    _benchmark()
