"""Each fast path equals its plain PyTorch twin, in value and in gradient.

The Triton kernel runs under TRITON_INTERPRET=1 on CPU (set in conftest.py):
exact but slow, so these tests use a handful of rows with full-size
vocabularies (49,152 = SmolLM2, 128,256 = Llama 3). On a CUDA machine the
kernel runs compiled, on tensors moved to the GPU (`on_kernel_device`).
"""

import pytest
import torch

from kernels.logprobs_chunked import (default_chunk_size, logprobs_from_hidden_chunked,
                                      logprobs_from_hidden_reference)


KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton kernel runs


def on_kernel_device(*tensors):
    return [t.to(KERNEL_DEVICE) for t in tensors]


@pytest.fixture
def triton_kernel():
    pytest.importorskip("triton")
    from kernels import logprobs_triton
    return logprobs_triton


def _value_and_grads(fn, inputs, grad_out):
    """fn(*inputs) -> [N]; returns the values and d(sum(grad_out * values))/d inputs."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out.detach(), grads


# ----------------------------------------------------------------------------- Triton kernel

def _logits(kind, N, V, gen):
    if kind == "random":
        return 3 * torch.randn(N, V, generator=gen)
    # extreme: +/-1e4 everywhere, so exp() over- or underflows unless the max is subtracted
    return 1e4 * torch.randint(-1, 2, (N, V), generator=gen).float()


@pytest.mark.parametrize("V", [49152, 128256])
@pytest.mark.parametrize("kind", ["random", "extreme"])
def test_triton_matches_twin_fp32(triton_kernel, V, kind):
    gen = torch.Generator().manual_seed(V)
    N = 6
    logits = _logits(kind, N, V, gen)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[2] = -100
    labels[3] = V - 1  # the last column lives in the final, partial block
    if kind == "extreme":
        logits[0, labels[0]] = 1e4  # one label at the max, one far below it
        logits[1, labels[1]] = -1e4
    grad_out = torch.randn(N, generator=gen)
    logits, labels, grad_out = on_kernel_device(logits, labels, grad_out)
    got, (g_got,) = _value_and_grads(lambda x: triton_kernel.logprobs_triton(x, labels), [logits],
                                     grad_out)
    ref, (g_ref,) = _value_and_grads(lambda x: triton_kernel.logprobs_reference(x, labels), [logits],
                                     grad_out)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-7)
    assert got[2] == 0 and (g_got[2] == 0).all()


@pytest.mark.parametrize("V", [49152, 128256])
def test_triton_bf16_accumulates_in_fp32(triton_kernel, V):
    gen = torch.Generator().manual_seed(1)
    N = 4
    logits = (3 * torch.randn(N, V, generator=gen)).bfloat16()
    labels = torch.randint(0, V, (N,), generator=gen)
    grad_out = torch.randn(N, generator=gen)
    logits, labels, grad_out = on_kernel_device(logits, labels, grad_out)
    got, (g_got,) = _value_and_grads(lambda x: triton_kernel.logprobs_triton(x, labels), [logits],
                                     grad_out)
    # the twin on the same bf16 values, computed in fp32 throughout
    ref, (g_ref,) = _value_and_grads(lambda x: triton_kernel.logprobs_reference(x, labels),
                                     [logits.float()], grad_out)
    assert got.dtype == torch.float32 and g_got.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    # the only difference allowed is storing the gradient in bf16: one bf16 ulp (2^-7
    # relative), since the interpreter converts fp32 -> bf16 by truncation (GPUs round)
    torch.testing.assert_close(g_got.float(), g_ref, rtol=2**-7, atol=1e-12)


def test_triton_fully_masked_rows(triton_kernel):
    logits, labels, ones = on_kernel_device(torch.randn(5, 49152), torch.full((5,), -100), torch.ones(5))
    got, (grad,) = _value_and_grads(lambda x: triton_kernel.logprobs_triton(x, labels), [logits], ones)
    assert (got == 0).all() and (grad == 0).all()


def test_triton_blocks_with_ragged_tail_and_gradcheck_fp64(triton_kernel):
    gen = torch.Generator().manual_seed(3)
    # V=21 with 8-column blocks: two full blocks and a 5-column tail
    logits, labels = on_kernel_device(torch.randn(3, 21, generator=gen, dtype=torch.float64),
                                      torch.tensor([20, -100, 4]))
    logits.requires_grad_()
    fn = lambda x: triton_kernel.logprobs_triton(x, labels, block_size=8)
    torch.testing.assert_close(fn(logits), triton_kernel.logprobs_reference(logits, labels))
    assert torch.autograd.gradcheck(fn, (logits,))


def test_token_logps_from_hidden_triton_impl(triton_kernel):
    from losses import token_logps_from_hidden
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(5, 16, generator=gen)
    weight = torch.randn(300, 16, generator=gen)
    labels = torch.tensor([0, 299, -100, 7, 150])
    grad_out = torch.randn(5, generator=gen)
    hidden, weight, labels, grad_out = on_kernel_device(hidden, weight, labels, grad_out)
    got, g_got = _value_and_grads(lambda h, w: token_logps_from_hidden(h, w, labels, impl="triton"),
                                  [hidden, weight], grad_out)
    ref, g_ref = _value_and_grads(lambda h, w: token_logps_from_hidden(h, w, labels, impl="naive"),
                                  [hidden, weight], grad_out)
    torch.testing.assert_close(got, ref)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- chunked

def _hidden_inputs(N=10, H=16, V=50, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen, dtype=dtype)
    weight = torch.randn(V, H, generator=gen, dtype=dtype) / H**0.5
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[[1, N - 3]] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_size", [3, 4, 10, 64])  # 3, 4: do not divide N=10
def test_chunked_matches_naive(chunk_size):
    hidden, weight, labels = _hidden_inputs()
    grad_out = torch.randn(10, generator=torch.Generator().manual_seed(9))
    got, g_got = _value_and_grads(
        lambda h, w: logprobs_from_hidden_chunked(h, w, labels, chunk_size=chunk_size),
        [hidden, weight], grad_out)
    ref, g_ref = _value_and_grads(lambda h, w: logprobs_from_hidden_reference(h, w, labels),
                                  [hidden, weight], grad_out)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_got, g_ref):  # hidden, weight
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert got[1] == 0 and (g_got[0][[1, 7]] == 0).all()  # the ignored rows


def test_chunked_tied_embedding_accumulates():
    # the lm_head weight is also the input embedding: both uses must reach weight.grad
    _, weight, labels = _hidden_inputs()
    ids = torch.randint(0, 50, (10,), generator=torch.Generator().manual_seed(5))
    mix = torch.randn(16, 16, generator=torch.Generator().manual_seed(6))

    def loss(logprob_fn):
        w = weight.clone().requires_grad_()
        hidden = torch.tanh(w[ids] @ mix)  # [N, H] from the embedding rows
        logprob_fn(hidden, w, labels).sum().backward()
        return w.grad

    chunked = loss(lambda h, w, y: logprobs_from_hidden_chunked(h, w, y, chunk_size=3))
    naive = loss(logprobs_from_hidden_reference)
    torch.testing.assert_close(chunked, naive, rtol=1e-5, atol=1e-5)


def test_chunked_frozen_weight_and_all_ignored():
    hidden, weight, labels = _hidden_inputs()
    h = hidden.clone().requires_grad_()
    logprobs_from_hidden_chunked(h, weight, labels, chunk_size=4).sum().backward()
    ref = hidden.clone().requires_grad_()
    logprobs_from_hidden_reference(ref, weight, labels).sum().backward()
    torch.testing.assert_close(h.grad, ref.grad, rtol=1e-5, atol=1e-5)

    ignored = torch.full_like(labels, -100)
    out, (gh, gw) = _value_and_grads(
        lambda h, w: logprobs_from_hidden_chunked(h, w, ignored, chunk_size=4), [hidden, weight],
        torch.ones(10))
    assert (out == 0).all() and (gh == 0).all() and (gw == 0).all()


def test_chunked_bf16_matches_twin():
    hidden, weight, labels = _hidden_inputs(N=12, H=32, V=200, dtype=torch.bfloat16)
    grad_out = torch.randn(12, generator=torch.Generator().manual_seed(7))
    got, g_got = _value_and_grads(
        lambda h, w: logprobs_from_hidden_chunked(h, w, labels, chunk_size=5), [hidden, weight],
        grad_out)
    ref, g_ref = _value_and_grads(lambda h, w: logprobs_from_hidden_reference(h, w, labels),
                                  [hidden, weight], grad_out)
    assert got.dtype == torch.float32 and g_got[1].dtype == torch.bfloat16
    torch.testing.assert_close(got, ref)  # same bf16 matmul, same fp32 log-softmax
    for a, b in zip(g_got, g_ref):
        # the weight gradient is summed over chunks in fp32, the twin sums in one bf16 GEMM
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


def test_chunked_under_autocast_recomputes_the_same_bf16_logits():
    # fp32 weights under bf16 autocast (--dtype bf16). Logits of ~+-60 are rounded
    # to steps of 0.25-0.5 in bf16: a backward that recomputed them in fp32 against
    # the forward's bf16 logsumexp would get a softmax off by up to e^0.5.
    hidden, weight, labels = _hidden_inputs(N=12, H=32, V=200)
    hidden = hidden * 20
    grad_out = torch.randn(12, generator=torch.Generator().manual_seed(7))

    def under_autocast(fn):  # forward under autocast, backward outside it, as in training
        def run(h, w):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(h, w)
        return run

    got, g_got = _value_and_grads(under_autocast(lambda h, w: logprobs_from_hidden_chunked(h, w, labels, chunk_size=5)),
                                  [hidden, weight], grad_out)
    ref, g_ref = _value_and_grads(under_autocast(lambda h, w: logprobs_from_hidden_reference(h, w, labels)),
                                  [hidden, weight], grad_out)
    fp32, _ = _value_and_grads(lambda h, w: logprobs_from_hidden_reference(h, w, labels), [hidden, weight],
                               grad_out)
    assert (got - fp32).abs().max() > 0.05  # the forward did run in bf16
    torch.testing.assert_close(got, ref)
    for a, b in zip(g_got, g_ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b.float(), rtol=2e-2, atol=2e-2)


def test_chunked_gradcheck_fp64():
    hidden, weight, labels = _hidden_inputs(N=5, H=3, V=7, dtype=torch.float64)
    fn = lambda h, w: logprobs_from_hidden_chunked(h, w, labels, chunk_size=2)
    assert torch.autograd.gradcheck(fn, (hidden.requires_grad_(), weight.requires_grad_()))


def test_default_chunk_size():
    assert default_chunk_size(49152) == 341  # 64 MiB / (4 bytes * 49,152)
    assert default_chunk_size(128256) == 256  # clamped to the minimum
