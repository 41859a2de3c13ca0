"""The GPU checks, in one run: the Triton kernel against its twin at real
shapes, its bandwidth, the three log-prob paths' time and memory, the training
scripts on a random-weight model of a real checkpoint's shape, and the test
suite on CUDA.

    python bench/gpu_check.py --tokenizer DIR [--out runs/gpu_check]
    python bench/gpu_check.py --tokenizer DIR --quick --device cpu   # a dry run of the script itself

DIR holds SmolLM2's tokenizer.json and tokenizer_config.json (the converted
default checkpoint's folder, ~/.cache/safe-to-serve/smollm2-135m-instruct-v1):
the scripts' model is SmolLM2-1.7B's shape (which uses that tokenizer) with
random weights, since no weights can be downloaded on the GPU machine.
Each stage prints its result and is written to OUT/gpu_check.json; a stage
that fails is reported and the rest still run. docs/performance.md, "On a GPU",
holds a run's numbers.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from statistics import median

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# SmolLM2-1.7B-Instruct's config.json (its shape; the weights here are random)
SMOLLM2_1_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                "vocab_size": 49152, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 64, "rms_norm_eps": 1e-5,
                "rope_theta": 130000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True,
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "bfloat16"}
TINY = dict(SMOLLM2_1_7B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)


def timed(fn, device, iters):
    """Mean seconds of fn() over iters calls, after one warm-up call."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


def peak_bytes(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def stage_env(args, device):
    info = {"torch": torch.__version__, "python": sys.version.split()[0], "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, memory_gib=round(p.total_memory / 2**30, 1), sm=p.multi_processor_count,
                    bf16=torch.cuda.is_bf16_supported())
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def stage_kernel_parity(args, device):
    """Triton vs its twin (log_softmax + gather) at Llama 3's vocabulary: values and gradients."""
    from kernels.logprobs_triton import logprobs_reference, logprobs_triton
    N, V = (64, 1000) if args.quick else (2048, 128256)
    gen = torch.Generator(device=device).manual_seed(0)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        logits = (3 * torch.randn(N, V, device=device, generator=gen)).to(dtype)
        logits[: N // 8] = 1e4 * torch.randint(-1, 2, (N // 8, V), device=device, generator=gen).to(dtype)
        labels = torch.randint(0, V, (N,), device=device, generator=gen)
        labels[::7] = -100
        grad_out = torch.randn(N, device=device, generator=gen)
        res = []
        for fn, x in ((logprobs_triton, logits), (logprobs_reference, logits.float())):
            x = x.detach().clone().requires_grad_()
            val = fn(x, labels)
            (grad,) = torch.autograd.grad(val, x, grad_out)
            res.append((val.float(), grad.float()))
        (v, g), (v_ref, g_ref) = res
        out[str(dtype).replace("torch.", "")] = {
            "max_abs_value_diff": (v - v_ref).abs().max().item(),
            "max_abs_grad_diff": (g - g_ref).abs().max().item(),
            "max_abs_grad": g_ref.abs().max().item()}
        torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(g, g_ref, rtol=2**-7 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)
    return {"shape": [N, V], **out}


def stage_kernel_bandwidth(args, device):
    """Forward and backward of the fused kernel vs the twin: time and bytes moved per second."""
    from kernels.logprobs_triton import logprobs_reference, logprobs_triton
    N, V = (64, 1000) if args.quick else (8192, 128256)
    logits = torch.randn(N, V, device=device, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, V, (N,), device=device)
    floor = N * V * logits.element_size()  # read the logits once
    res = {"shape": [N, V], "dtype": "bfloat16"}
    for name, fn in (("triton", logprobs_triton), ("twin", logprobs_reference)):
        fwd = timed(lambda: fn(logits, labels), device, args.iters)
        out = fn(logits, labels)
        bwd = timed(lambda: torch.autograd.grad(out.sum(), logits, retain_graph=True), device, args.iters)
        mem = peak_bytes(lambda: torch.autograd.grad(fn(logits, labels).sum(), logits), device)
        res[name] = {"fwd_ms": fwd * 1e3, "bwd_ms": bwd * 1e3, "fwd_GBps": floor / fwd / 1e9,
                     "bwd_GBps": 2 * floor / bwd / 1e9, "peak_extra_GiB": mem and mem / 2**30}
    res["speedup_fwd_bwd"] = ((res["twin"]["fwd_ms"] + res["twin"]["bwd_ms"])
                              / (res["triton"]["fwd_ms"] + res["triton"]["bwd_ms"]))
    return res


def stage_logprob_paths(args, device):
    """losses.token_logps_from_hidden: naive / chunked / triton, fwd + bwd from hidden [N, H] and head [V, H]."""
    from losses import token_logps_from_hidden
    N, H, V = (64, 32, 1000) if args.quick else (8192, 2048, 128256)
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(N, H, device=device, generator=gen, dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(V, H, device=device, generator=gen) / H**0.5).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (N,), device=device, generator=gen)
    res, first = {"shape": {"N": N, "H": H, "V": V}, "dtype": "bfloat16"}, None
    impls = ["naive", "chunked"] + (["triton"] if device.type == "cuda" else [])
    for impl in impls:
        def step():
            return torch.autograd.grad(token_logps_from_hidden(hidden, weight, labels, impl=impl).sum(),
                                       (hidden, weight))
        sec = timed(step, device, args.iters)
        mem = peak_bytes(step, device)
        val = token_logps_from_hidden(hidden, weight, labels, impl=impl).float()
        first = val if first is None else first
        res[impl] = {"ms": sec * 1e3, "peak_extra_GiB": mem and mem / 2**30,
                     "max_abs_diff_vs_naive": (val - first).abs().max().item()}
    return res


def run_script(cmd, log, timeout):
    t0 = time.time()
    p = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
    log.write(f"$ python {' '.join(cmd)}\n{p.stdout}\n{p.stderr}\n")
    log.flush()
    if p.returncode:
        raise RuntimeError(f"python {' '.join(cmd[:2])} exited {p.returncode}: {p.stderr.strip()[-600:]}")
    return time.time() - t0


def steps_of(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def stage_scripts(args, device):
    """sft.py, dpo.py (triton and chunked log-probs), eval.py on a random SmolLM2-1.7B-shaped checkpoint."""
    import model as model_lib
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    res = {}
    try:
        cfg = model_lib.LlamaConfig.from_dict(TINY if args.quick else SMOLLM2_1_7B)
        torch.manual_seed(0)
        with torch.device(device):
            net = model_lib.Llama(cfg)
        for name, p in net.named_parameters():  # random weights at a trained model's scale
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
        ckpt = model_lib.save_model(net, work / "ckpt", tokenizer_dir=args.tokenizer, dtype=torch.bfloat16)
        res["params_M"] = round(sum(p.numel() for p in net.parameters()) / 1e6, 1)
        del net
        steps, common = str(args.steps), ["--batch-size", "8", "--max-len", "256", "--dtype", "auto", "--quiet",
                                          "--save-every", "0", "--warmup-steps", "0"]
        with open(Path(args.out) / "scripts.log", "w") as log:
            sec = run_script(["sft.py", "--ckpt", str(ckpt), "--data", "demo_data/sit_train.json", "--out",
                              str(work / "sft"), "--max-steps", steps, "--lr", "1e-5", *common], log, 180)
            sft = steps_of(work / "sft")
            res["sft"] = {"wall_s": round(sec, 1), "losses": [round(s["loss"], 4) for s in sft],
                          "tokens_per_s_median": median(s["tokens_per_s"] for s in sft)}
            for impl in ("triton", "chunked"):
                sec = run_script(["dpo.py", "--ckpt", str(ckpt), "--data", "demo_data/prefs_train.jsonl", "--out",
                                  str(work / f"dpo_{impl}"), "--max-steps", steps, "--lr", "1e-6",
                                  "--logprob-impl", impl, *common], log, 180)
                dpo = steps_of(work / f"dpo_{impl}")
                res[f"dpo_{impl}"] = {"wall_s": round(sec, 1), "losses": [round(s["loss"], 5) for s in dpo],
                                      "margins": [round(s["rewards/margins"], 5) for s in dpo],
                                      "s_per_step_median": median(s["s_per_step"] for s in dpo),
                                      "tokens_per_s_median": median(s["tokens_per_s"] for s in dpo)}
            sec = run_script(["eval.py", "--ckpt", f"random={ckpt}", "--bench", "demo_data/eval_harmful.jsonl",
                              "--ordinary", "demo_data/ordinary_eval.jsonl", "--out", str(work / "eval"),
                              "--max-new-tokens", "32", "--batch-size", "32"], log, 180)
            res["eval"] = {"wall_s": round(sec, 1),
                           "results": json.loads((work / "eval" / "results.json").read_text())["results"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return res


def stage_tests(args, device):
    """The whole test suite on this machine (on a GPU the Triton tests run compiled, not interpreted)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x" if args.quick else "-rf"]
    if args.workers > 1:
        cmd += ["-n", str(args.workers)]
    cmd += ["tests/test_kernels.py"] if args.quick else []
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.test_timeout)
        text, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    (Path(args.out) / "pytest.log").write_text(text)
    tail = [ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR")) or " passed" in ln
            or " failed" in ln]
    return {"rc": rc, "seconds": round(time.time() - t0, 1), "summary": tail[-40:]}


STAGES = {"env": stage_env, "kernel_parity": stage_kernel_parity, "kernel_bandwidth": stage_kernel_bandwidth,
          "logprob_paths": stage_logprob_paths, "tests": stage_tests, "scripts": stage_scripts}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="folder with SmolLM2's tokenizer.json (+ tokenizer_config.json)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--quick", action="store_true", help="tiny shapes: checks the script, not the GPU")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--steps", type=int, default=6, help="optimiser steps per training script")
    ap.add_argument("--workers", type=int, default=8, help="pytest-xdist workers (1: none)")
    ap.add_argument("--test-timeout", type=int, default=200)
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    report = {}
    for name in args.stages.split(","):
        t0 = time.time()
        try:
            report[name] = STAGES[name](args, device)
            status = "ok"
        except Exception as e:  # a stage that breaks is a finding; the others still run
            report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            status = "FAILED"
        print(f"== {name}: {status} ({time.time() - t0:.0f}s)\n{json.dumps(report[name], indent=1)[:4000]}",
              flush=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
