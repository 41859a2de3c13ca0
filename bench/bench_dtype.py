"""Is bf16 autocast faster than fp32 on this CPU? What `--dtype auto` should pick.

    python bench/bench_dtype.py

Times a forward and backward pass of one of SmolLM2-135M's MLP matrices
(576 -> 1536, 1,024 tokens) under fp32 and under bf16 autocast, in one run,
and prints the ratio beside what common.native_bf16 chooses for this machine.
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def seconds_per_pass(layer, x, bf16: bool, repeats: int = 20) -> float:
    def one():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = layer(x)
        y.float().sum().backward()

    for _ in range(3):  # warm-up: kernels chosen, memory allocated
        one()
    t0 = time.perf_counter()
    for _ in range(repeats):
        one()
    return (time.perf_counter() - t0) / repeats


def main():
    torch.manual_seed(0)
    layer = torch.nn.Linear(576, 1536, bias=False)
    x = torch.randn(1024, 576, requires_grad=True)
    fp32, bf16 = seconds_per_pass(layer, x, False), seconds_per_pass(layer, x, True)
    cpu = torch.cpu
    print(f"CPU vendor {common.cpu_vendor() or '?'}; AVX512-BF16 {cpu._is_avx512_bf16_supported()}, "
          f"AMX {cpu._is_amx_tile_supported()}; {torch.get_num_threads()} threads")
    print(f"fp32 {fp32 * 1e3:.1f} ms, bf16 autocast {bf16 * 1e3:.1f} ms per pass: bf16 is {fp32 / bf16:.2f}x fp32's "
          f"speed; --dtype auto picks {'bf16' if common.native_bf16(torch.device('cpu')) else 'fp32'}")


if __name__ == "__main__":
    main()
