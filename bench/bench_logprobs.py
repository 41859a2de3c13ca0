"""Benchmark: label log-probs from hidden states, naive vs chunked, on the CPU.

    python bench/bench_logprobs.py            # SmolLM2: N=2,048, H=576, V=49,152
    python bench/bench_logprobs.py --large    # also N=8,192, H=576, V=128,256 (Llama 3 vocab)

Measured: forward + backward of `logps.sum()` with fp32 hidden [N, H] and
weight [V, H], both requiring grad.
- naive:   `hidden @ weight.T` -> `log_softmax` -> `gather` (plain autograd)
- chunked: kernels/logprobs_chunked.py (logits recomputed per chunk in backward)

Memory is measured honestly on the CPU: every (path, shape) runs in a fresh
subprocess, which records its resident set size after building the inputs
(baseline) and reads the peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`)
after one forward + backward. Peak minus baseline is what the path added,
including the [V, H] weight gradient that both paths allocate. Time is
measured afterwards in this process, alternating naive and chunked runs (so a
busy neighbour on the machine slows both alike), best of `--repeats`.
Goals: chunked peak <= 1/4 of naive, chunked time <= 1.2x naive.
"""

import argparse
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def current_rss_bytes():
    """Resident set size now, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_inputs(N, H, V):
    import torch
    torch.manual_seed(0)
    hidden = torch.randn(N, H, requires_grad=True)
    weight = (0.02 * torch.randn(V, H)).requires_grad_()
    labels = torch.randint(0, V, (N,))
    return hidden, weight, labels


def path_fn(path, chunk_size):
    sys.path.insert(0, ROOT)
    from kernels.logprobs_chunked import (logprobs_from_hidden_chunked,
                                          logprobs_from_hidden_reference)
    if path == "naive":
        return logprobs_from_hidden_reference
    return lambda h, w, y: logprobs_from_hidden_chunked(h, w, y, chunk_size=chunk_size)


def peak_memory_child(path, N, H, V, chunk_size):
    """Runs in a fresh child process: extra peak RSS bytes of one forward + backward."""
    hidden, weight, labels = make_inputs(N, H, V)
    fn = path_fn(path, chunk_size)
    baseline = current_rss_bytes()
    fn(hidden, weight, labels).sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return peak - baseline


def peak_memory(path, N, H, V, chunk_size):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", path, str(N), str(H), str(V),
           str(chunk_size or 0)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def best_times(N, H, V, chunk_size, repeats):
    """Alternate the two paths `repeats` times; best seconds of each."""
    hidden, weight, labels = make_inputs(N, H, V)
    fns = {p: path_fn(p, chunk_size) for p in ("naive", "chunked")}
    best = {p: float("inf") for p in fns}
    for _ in range(repeats):
        for p, fn in fns.items():
            hidden.grad = weight.grad = None
            start = time.perf_counter()
            fn(hidden, weight, labels).sum().backward()
            best[p] = min(best[p], time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="also N=8192, V=128256 (naive needs ~17 GB)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="tokens per chunk (default: kernels.logprobs_chunked.default_chunk_size)")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, *nums = args.child
        N, H, V, chunk = map(int, nums)
        print(peak_memory_child(path, N, H, V, chunk or None))
        return

    import torch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, "
          f"forward + backward of sum(label logps); memory = peak RSS - baseline (fresh process)")
    shapes = [(2048, 576, 49152)] + ([(8192, 576, 128256)] if args.large else [])
    print(f"{'N':>6} {'H':>5} {'V':>7} {'path':>8} {'peak MiB':>9} {'seconds':>8}")
    for N, H, V in shapes:
        mem = {p: peak_memory(p, N, H, V, args.chunk_size) for p in ("naive", "chunked")}
        secs = best_times(N, H, V, args.chunk_size, args.repeats)
        for p in mem:
            print(f"{N:>6} {H:>5} {V:>7} {p:>8} {mem[p] / 2**20:>9.0f} {secs[p]:>8.3f}")
        mem, t = mem["chunked"] / mem["naive"], secs["chunked"] / secs["naive"]
        print(f"  chunked / naive: memory {mem:.3f} (goal <= 0.25, {'met' if mem <= 0.25 else 'NOT met'}), "
              f"time {t:.2f}x (goal <= 1.2x, {'met' if t <= 1.2 else 'NOT met'})")


if __name__ == "__main__":
    main()
