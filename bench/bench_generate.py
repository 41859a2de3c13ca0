"""Sampling throughput: our generate() vs transformers' generate(), same checkpoint, one run.

    python bench/bench_generate.py [--ckpt smollm2] [--batch 8] [--new 120] [--repeats 3]

SmolLM2-135M, fp32 CPU, batch of 8 prompts x 120 new tokens, temperature 0.85,
top-p 0.95 (the RAFT setting). Both sides are forced to produce every token
(no early stop at EOS), so tokens/s counts the same work. Each side runs
`repeats` times after one warm-up; the median is reported.
Goal: ours >= 1.5x transformers' tokens/s. "ours" packs the linear
weights for oneDNN while generating (kernels.packed_linear.PackedLinear, the default on a CPU);
"ours, unpacked" is the same code with plain F.linear, the way transformers runs.
"""
import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import generation  # noqa: E402
import model as model_lib  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a short poem about autumn leaves.",
           "Explain how photosynthesis works.", "Give me three tips for learning Python.",
           "How do I make a good cup of coffee?", "What causes the seasons on Earth?",
           "Summarise the plot of Romeo and Juliet.", "Why is the sky blue?"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="smollm2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import transformers

    path = model_lib.resolve_ckpt(args.ckpt)
    ours = model_lib.load_model(path)
    tok = dataclasses.replace(data.load_tokenizer(path), stop_ids=set())  # never stop early
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[:args.batch]
    enc = [data.encode_prompt(tok, p) for p in prompts]
    L = max(map(len, enc))
    ids = torch.tensor([[tok.pad_id] * (L - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in enc])
    n_tokens = args.batch * args.new

    def run_ours(seed, pack=None):
        out = generation.generate(ours, tok, enc, max_new_tokens=args.new, temperature=0.85, top_p=0.95,
                                  seed=seed, batch_size=args.batch, pack=pack)
        assert sum(len(r[0]["ids"]) for r in out) == n_tokens

    def run_hf(seed):
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.85, top_p=0.95,
                              top_k=0, max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=tok.pad_id)
        assert out.shape[1] - L == args.new

    rates = {}
    for name, fn in (("ours", run_ours), ("ours, unpacked", lambda seed: run_ours(seed, pack=False)),
                     ("transformers", run_hf)):
        fn(0)  # warm-up
        times = []
        for r in range(args.repeats):
            t = time.perf_counter()
            fn(r + 1)
            times.append(time.perf_counter() - t)
        rates[name] = n_tokens / statistics.median(times)
        print(f"{name:>14}: {rates[name]:7.1f} tokens/s  (median of {args.repeats}, {n_tokens} tokens per run)")
    print(f"ratio ours / transformers: {rates['ours'] / rates['transformers']:.2f}x  (goal >= 1.5x); "
          f"unpacked / transformers: {rates['ours, unpacked'] / rates['transformers']:.2f}x")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
