"""One DPO optimiser step on SmolLM2-135M, CPU, full fine-tuning: the path
dpo.py takes against the naive one (and, with --trl, TRL's DPOTrainer), each
measured in the same run.

    OMP_NUM_THREADS=2 python bench/bench_dpo.py [--pairs 4 --max-len 256 --steps 3] [--trl]

  fast   --ref precompute: reference log-probs computed once beforehand (timed
         separately, it is a one-off pass over the data), then per step one
         policy forward over the pair rows [B, T] (data.collate_pairs: each
         prompt computed once, both answers branch off it) and chunked
         log-probs from the hidden states (no [B, T, V] logits). fp32.
  fast-gc  the same with --grad-checkpointing (activations recomputed in
         backward: the activation memory of 30 layers is most of the peak),
         which also sets glibc to return freed memory (common.return_freed_memory).
  fast-gc-thp  checkpointing with THP_MEM_ALLOC_ENABLE=1 (PyTorch puts
         tensors of 2 MiB or more on transparent huge pages: far fewer page
         faults) and glibc's default allocator; the variable must be set before
         Python starts, so this path's process gets it in its environment.
  fast-bf16  the fast path under bf16 autocast (`--dtype bf16`: fp32 master
         weights and optimiser, bf16 matmuls), fast where the CPU has bf16
         instructions (AVX512-BF16 / AMX); skipped elsewhere, as is
         trl-defaults: emulated bf16 takes minutes a step.
  naive  a frozen reference copy runs every step over separate rows
         (prompt + chosen, prompt + rejected: [2B, T]), and both models produce
         full logits [2B, T, V] for log_softmax + gather. fp32.
  trl    (--trl) TRL's DPOTrainer on the same pairs, fp32, no checkpointing;
  trl-defaults  the same with DPOConfig's defaults (bf16, gradient checkpointing);
  trl-gc-thp  fp32, gradient checkpointing and THP_MEM_ALLOC_ENABLE=1: TRL
         with the settings of fast-gc-thp, the like-for-like rival.

Our paths run as dpo.py does: the optimiser from common.make_optimizer (fused
AdamW), padding skipped by the model (it computes on the real tokens only), and
common.return_freed_memory() at start with checkpointing.

Each path runs in its own process, so its peak RSS (ru_maxrss) is its own.
Prints seconds/step (median), tokens/s, peak RSS, the ratios, and checks that
the fast paths' first losses equal the naive path's (same weights, same batch).
Run nothing else meanwhile: two busy processes on 2 cores slow both many times over.
"""
import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PKU = ROOT.parent / "shared" / "data" / "pku_saferlhf_pairs.jsonl"


PATHS = ("fast", "fast-gc", "fast-gc-thp", "fast-bf16", "naive")
TRL_PATHS = ("trl", "trl-defaults", "trl-gc-thp")
BF16_PATHS = ("fast-bf16", "trl-defaults")  # run only where the CPU multiplies bf16 natively


def longest_pairs(tok, n, max_len):
    """The n pairs with the longest answers that fit max_len (real data if
    present, else the demo set), tokenised."""
    import data

    source = PKU if PKU.is_file() else ROOT / "demo_data" / "prefs_train.jsonl"
    train, _ = data.tokenize_pairs(tok, data.load_preferences(source)[:2000], max_len)
    return sorted(train, key=answer_length, reverse=True)[:n], str(source)


def answer_length(ex):
    """The longer of the two sequences prompt + answer (each must fit max_len)."""
    return len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"]))


def separate_rows(examples, pad_id):
    """The naive layout: [2B, T], prompt + chosen rows, then prompt + rejected rows."""
    import data

    return data.collate_sft([{"input_ids": e["prompt_ids"] + e[k], "n_prompt": len(e["prompt_ids"]), "index": 0}
                             for k in ("chosen_ids", "rejected_ids") for e in examples], pad_id)


def run_trl(path, n_pairs, max_len, steps):
    """TRL's DPOTrainer on the same 4 pairs (same rendered prompts, same answers +
    <|im_end|>), max_length 256, a frozen reference copy. `trl`: fp32, no gradient
    checkpointing (our fast path's settings); `trl-defaults`: DPOConfig's own
    defaults on this machine (bf16 and gradient checkpointing on);
    `trl-gc-thp`: fp32 with gradient checkpointing, run with
    THP_MEM_ALLOC_ENABLE=1, the like-for-like rival of fast-gc-thp."""
    import time as _time

    import datasets
    import torch
    import transformers
    import trl

    import data
    import model as model_lib

    torch.manual_seed(0)
    tok = data.load_tokenizer(None)
    examples, source = longest_pairs(tok, n_pairs, max_len)
    pairs = data.load_preferences(source)[:2000]
    chosen_pairs = [pairs[ex["index"]] for ex in examples]
    end = tok.decode([tok.end_of_turn_id], skip_special=False)
    ds = datasets.Dataset.from_list([{"prompt": data.render_prompt(tok, p["prompt"]),
                                      "chosen": p["chosen"].strip() + end,
                                      "rejected": p["rejected"].strip() + end} for p in chosen_pairs])
    ckpt = str(model_lib.resolve_ckpt(None))
    hf_tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    policy = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    settings = {"trl": {"bf16": False, "gradient_checkpointing": False}, "trl-defaults": {},
                "trl-gc-thp": {"bf16": False, "gradient_checkpointing": True}}[path]
    cfg = trl.DPOConfig(output_dir="/tmp/bench_dpo_trl", per_device_train_batch_size=n_pairs, max_steps=steps,
                        learning_rate=5e-6, beta=0.1, max_length=max_len, logging_steps=1, report_to="none",
                        save_strategy="no", use_cpu=True, dataloader_num_workers=0, lr_scheduler_type="constant",
                        **settings)
    times, step_losses = [], []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = _time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(_time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                step_losses.append(logs["loss"])

    trainer = trl.DPOTrainer(model=policy, args=cfg, train_dataset=ds, processing_class=hf_tok, callbacks=[Clock()])
    batch = next(iter(trainer.get_train_dataloader()))
    n_tokens = int(sum(batch[k].sum() for k in batch if k.endswith("attention_mask")))
    trainer.train()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"path": path, "s_per_step": statistics.median(times), "times": times,
            "tokens_per_s": n_tokens / statistics.median(times), "peak_rss_gb": peak_kb / 2**20,
            "losses": step_losses, "ref_seconds": 0.0, "shape": [], "data": source,
            "threads": torch.get_num_threads(), "settings": {"bf16": cfg.bf16, "gradient_checkpointing":
                                                            cfg.gradient_checkpointing, "trl": trl.__version__}}


def run_path(path, n_pairs, max_len, steps):
    if path.startswith("trl"):
        return run_trl(path, n_pairs, max_len, steps)
    import torch

    import common
    import data
    import losses
    import model as model_lib

    if path == "fast-gc":
        common.return_freed_memory()  # as dpo.py does with --grad-checkpointing (common.Run)
    torch.manual_seed(0)
    tok = data.load_tokenizer(None)
    examples, source = longest_pairs(tok, n_pairs, max_len)
    naive_batch = separate_rows(examples, tok.pad_id)  # [2B, T]
    batch = data.collate_pairs(examples, tok.pad_id)  # [B, T'] pair rows, as dpo.py takes them
    if path == "naive":
        batch = naive_batch
    ids, att, mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    B = n_pairs
    policy = model_lib.load_model(None, dtype=torch.float32).train()
    policy.gradient_checkpointing = path.startswith("fast-gc")

    def logps_fast():  # as dpo.pair_logps: one row per pair, the prompt computed once
        hidden = policy(ids, att, return_hidden=True, segments=batch["segments"])
        per_token = losses.response_token_logps(hidden, policy.lm_head_weight, ids, mask, impl="chunked")
        return torch.cat([losses.reduce_sequence(per_token, batch[k]) for k in ("chosen_mask", "rejected_mask")])

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=path == "fast-bf16")
    opt, _ = common.make_optimizer(policy, SimpleNamespace(lr=5e-6, weight_decay=0.0, warmup_steps=0), steps)
    ref_seconds = 0.0
    if path != "naive":
        t0 = time.perf_counter()
        with torch.no_grad(), autocast:
            ref = logps_fast()  # [2B], computed once
        ref_seconds = time.perf_counter() - t0
    else:
        ref_model = copy.deepcopy(policy).eval().requires_grad_(False)

    times, step_losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        if path != "naive":
            with autocast:
                logps = logps_fast()  # [2B]: chosen, then rejected
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
            "tokens_per_s": int(naive_batch["attention_mask"].sum()) / statistics.median(times),
            "peak_rss_gb": peak_kb / 2**20, "losses": step_losses, "ref_seconds": ref_seconds,
            "shape": list(ids.shape), "real_tokens": int(att.sum()), "data": source, "threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--trl", action="store_true", help="also run TRL's DPOTrainer (pip install trl)")
    ap.add_argument("--path", choices=PATHS + TRL_PATHS, help="(internal) run one path and print JSON")
    a = ap.parse_args()
    if a.path:
        print(json.dumps(run_path(a.path, a.pairs, a.max_len, a.steps)))
        return
    import torch

    import common

    res = {}
    for path in PATHS + (TRL_PATHS if a.trl else ()):
        if path in BF16_PATHS and not common.native_bf16(torch.device("cpu")):
            print(f"{path}: skipped, this CPU has no native bf16 (emulated, it takes minutes a step)")
            continue
        env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1" if path.endswith("-thp") else "0")
        out = subprocess.run([sys.executable, __file__, "--path", path, "--pairs", str(a.pairs), "--max-len",
                              str(a.max_len), "--steps", str(a.steps)], capture_output=True, text=True, env=env)
        if out.returncode:
            print(f"path {path} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            if path in TRL_PATHS:
                continue
            sys.exit(1)
        res[path] = json.loads(out.stdout.strip().splitlines()[-1])
    f, n = res["fast"], res["naive"]
    print(f"batch: {a.pairs} pairs from {f['data']}, {f['threads']} threads: naive rows [2B, T] = {n['shape']} "
          f"({n['real_tokens']} real tokens); pair rows [B, T] = {f['shape']} ({f['real_tokens']} real tokens: "
          "each prompt once); tokens/s counts the naive rows' real tokens for every path")
    for r in res.values():
        print(f"{r['path']:>12}: {r['s_per_step']:5.2f} s/step (steps {', '.join(f'{t:.2f}' for t in r['times'])}), "
              f"{r['tokens_per_s']:4.0f} tokens/s, peak RSS {r['peak_rss_gb']:.2f} GB {r.get('settings', '')}")
    print(f"fast: reference log-probs precomputed once in {f['ref_seconds']:.2f} s (not part of the step)")
    baselines = [("naive", n)] + [(p, res[p]) for p in TRL_PATHS if p in res]
    for p in [p for p in PATHS if p.startswith("fast") and p in res]:
        r = res[p]
        print(f"{p:>12}: " + "; ".join(f"vs {bn}: {b['s_per_step'] / r['s_per_step']:.2f}x faster, "
                                       f"{r['peak_rss_gb'] / b['peak_rss_gb']:.2f} of its memory"
                                       for bn, b in baselines))
    diff = max(abs(res[p]["losses"][0] - n["losses"][0]) for p in ("fast", "fast-gc", "fast-gc-thp"))
    print("first-step loss: " + " ".join(f"{p} {r['losses'][0]:.6f}" for p, r in res.items())
          + f" (fast vs naive max |diff| {diff:.2e})")
    if diff > 1e-4:
        sys.exit("the fast path's loss differs from the naive path's")


if __name__ == "__main__":
    main()
