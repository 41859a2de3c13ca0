"""One DPO optimiser step on SmolLM2-135M, fp32 CPU, full fine-tuning: the
path dpo.py takes against the naive one, measured in the same run.

    OMP_NUM_THREADS=2 python bench/bench_dpo.py [--pairs 4 --max-len 256 --steps 3]

  fast   --ref precompute: reference log-probs computed once beforehand (timed
         separately, it is a one-off pass over the data), then per step one
         policy forward over chosen+rejected [2B, T] and chunked log-probs
         from the hidden states (no [2B, T, V] logits).
  fast-gc  the same with --grad-checkpointing (activations recomputed in
         backward: the activation memory of 30 layers is most of the peak).
  naive  a frozen reference copy runs every step, and both models produce full
         logits [2B, T, V] for log_softmax + gather.

Each path runs in its own process, so its peak RSS (ru_maxrss) is its own.
Prints seconds/step (median), tokens/s, peak RSS, the ratios, and checks that
the two paths' first losses are equal (same weights, same batch). For
reference, TRL's DPOTrainer on the same batch measured ~16 s/step median and
8.3 GB peak RSS on this kind of machine (the issue's numbers, not re-measured here).
"""
import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PKU = ROOT.parent / "shared" / "data" / "pku_saferlhf_pairs.jsonl"


def batch_of_pairs(tok, n, max_len):
    """The n longest pairs that fit max_len (real data if present, else the demo set)."""
    import data

    source = PKU if PKU.is_file() else ROOT / "demo_data" / "prefs_train.jsonl"
    train, _ = data.tokenize_pairs(tok, data.load_preferences(source)[:2000], max_len)
    train = sorted(train, key=data.example_length, reverse=True)[:n]
    return data.collate_pairs(train, tok.pad_id), str(source)


def run_path(path, n_pairs, max_len, steps):
    import torch

    import data
    import losses
    import model as model_lib

    torch.manual_seed(0)
    tok = data.load_tokenizer(None)
    batch, source = batch_of_pairs(tok, n_pairs, max_len)
    ids, att, mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    B = n_pairs
    policy = model_lib.load_model(None, dtype=torch.float32).train()
    policy.gradient_checkpointing = path == "fast-gc"
    opt = torch.optim.AdamW(policy.parameters(), lr=5e-6)
    ref_seconds = 0.0
    if path != "naive":
        t0 = time.perf_counter()
        with torch.no_grad():
            ref = losses.sequence_logps_from_hidden(policy(ids, att, return_hidden=True), policy.lm_head_weight,
                                                    ids, mask, impl="chunked")  # [2B], computed once
        ref_seconds = time.perf_counter() - t0
    else:
        ref_model = copy.deepcopy(policy).eval().requires_grad_(False)

    times, step_losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        if path != "naive":
            hidden = policy(ids, att, return_hidden=True)  # [2B, T, H]
            logps = losses.sequence_logps_from_hidden(hidden, policy.lm_head_weight, ids, mask, impl="chunked")
            ref_logps = ref
        else:
            with torch.no_grad():
                ref_logps = losses.sequence_logps(ref_model(ids, att), ids, mask)  # full [2B, T, V] logits
            logps = losses.sequence_logps(policy(ids, att), ids, mask)
        pair_losses, _ = losses.dpo_loss(logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], beta=0.1)
        loss = pair_losses.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        step_losses.append(loss.item())
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"path": path, "s_per_step": statistics.median(times), "times": times,
            "tokens_per_s": int(att.sum()) / statistics.median(times), "peak_rss_gb": peak_kb / 2**20,
            "losses": step_losses, "ref_seconds": ref_seconds, "shape": list(ids.shape), "data": source,
            "threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--path", choices=("fast", "fast-gc", "naive"), help="(internal) run one path and print JSON")
    a = ap.parse_args()
    if a.path:
        print(json.dumps(run_path(a.path, a.pairs, a.max_len, a.steps)))
        return
    res = {}
    for path in ("fast", "fast-gc", "naive"):
        out = subprocess.run([sys.executable, __file__, "--path", path, "--pairs", str(a.pairs), "--max-len",
                              str(a.max_len), "--steps", str(a.steps)], capture_output=True, text=True, check=True)
        res[path] = json.loads(out.stdout.strip().splitlines()[-1])
    f, g, n = res["fast"], res["fast-gc"], res["naive"]
    print(f"batch: {a.pairs} pairs -> input [2B, T] = {f['shape']} from {f['data']}, {f['threads']} threads")
    for r in (f, g, n):
        print(f"{r['path']:>7}: {r['s_per_step']:.2f} s/step (steps {', '.join(f'{t:.2f}' for t in r['times'])}), "
              f"{r['tokens_per_s']:.0f} tokens/s, peak RSS {r['peak_rss_gb']:.2f} GB")
    print(f"fast: reference log-probs precomputed once in {f['ref_seconds']:.2f} s (not part of the step)")
    for r in (f, g):
        print(f"{r['path']}: naive/{r['path']} time {n['s_per_step'] / r['s_per_step']:.2f}x, peak RSS "
              f"{n['peak_rss_gb'] / r['peak_rss_gb']:.2f}x; vs TRL DPOTrainer (16 s/step, 8.3 GB, from the "
              f"issue): {16 / r['s_per_step']:.2f}x its speed, {r['peak_rss_gb'] / 8.3:.2f} of its memory")
    diff = max(abs(r["losses"][0] - n["losses"][0]) for r in (f, g))
    print(f"first-step loss: fast {f['losses'][0]:.6f} fast-gc {g['losses'][0]:.6f} naive {n['losses'][0]:.6f} "
          f"(max |diff| {diff:.2e})")
    if diff > 1e-4:
        sys.exit("the fast path's loss differs from the naive path's")


if __name__ == "__main__":
    main()
