"""RAFT, reward-ranked fine-tuning (Dong et al. 2023), as the paper uses it to
make an instruction-tuned model safe: sample, score, keep the best, fine-tune.

    python raft.py --ckpt runs/sit --prompts demo_data/raft_prompts.jsonl --reward refusal --out runs/raft
    python raft.py --ckpt smollm2 --prompts ../shared/data/I-MaliciousInstructions.json \\
        --reward runs/rm --out runs/raft --iterations 2 --prompts-per-iter 100

One iteration i (the loop in `main`):
  1. take the next B prompts (--prompts-per-iter; the file is shuffled once with
     --seed and reused from the start when it runs out),
  2. sample K answers per prompt (generation.generate: each prompt is prefilled once
     and its KV cache copied to its K rows),
  3. score every (prompt, answer) with the reward (--reward),
  4. drop degenerate samples and keep the best (--rank local / global),
  5. fine-tune on the kept (prompt, answer) set with sft.py, starting from the
     current model; iteration i+1 samples from the result.

Ranking, the one place it is defined:
  * local (the paper's): per prompt, the highest-reward sample that is not
    degenerate. Ties go to the lowest sample index. A prompt whose K samples
    are all degenerate gives nothing.
  * global: every non-degenerate sample of the iteration ranked together, and
    the top ceil(--keep-frac x count) kept (default 1/K, as many as local would
    keep). Ties go to the lower (prompt index, sample index).

Degenerate samples (dropped before ranking, counted in the log):
  * empty: nothing but whitespace;
  * repetitive: more than --max-repeat (0.5) of the answer's token 4-grams
    repeat an earlier 4-gram ("I cannot I cannot I cannot ..."), for answers
    of at least 16 tokens;
  * truncated: stopped by --max-new-tokens instead of an end-of-turn token,
    only with --drop-truncated (SFT closes every kept answer with the
    end-of-turn token, so a kept truncated answer teaches stopping mid-thought).

Rewards (--reward):
  * DIR: a LlamaForSequenceClassification reward model (reward.py trains one;
    see the README for public ones with this layout), scored by reward.score_texts.
  * refusal: 1 if eval.is_refusal(answer) else 0. A string-pattern HEURISTIC
    for offline demos, the same judge eval.py reports with. It rewards refusing
    every prompt, benign ones included, and says nothing about quality.
  * count:TEXT: how many times TEXT occurs in the answer. A toy reward for
    tests and smoke runs.

Outputs in --out: iter_<i>/samples.jsonl (every prompt, its K answers, their
scores, why any was dropped, which was kept), iter_<i>/kept.jsonl (the SFT
data), iter_<i>/ (the fine-tuned checkpoint, sft.py's layout), raft_log.jsonl
(one line of statistics per iteration), raft_config.json.

What is simplified, and why:
  * Samples are scored after all of an iteration's sampling, and the policy
    and the reward model are never on the device while SFT runs (the policy is
    reloaded by sft.py): simpler, and memory stays at one model plus the RM.
  * Kept answers go to SFT as text and are tokenized again, so the trained ids
    may differ from the sampled ones where BPE would merge differently; this
    is what the paper's pipeline does by writing a dataset.
  * --resume restarts an unfinished iteration from its sampling step
    (sampling is seeded, so it draws the same samples) and SFT from scratch.
"""
import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch

import common
import data
import generation
import model as model_lib


# ----------------------------------------------------------------------------
# Rewards

def make_reward(spec: str, device=None, batch_size: int = 16):
    """--reward SPEC -> fn(prompts, answers) -> list of floats (higher is better)."""
    if spec == "refusal":
        from eval import is_refusal
        return lambda prompts, answers: [1.0 if is_refusal(a) else 0.0 for a in answers]
    if spec.startswith("count:"):
        text = spec[len("count:"):]
        if not text:
            raise ValueError("--reward count:TEXT needs a non-empty TEXT")
        return lambda prompts, answers: [float(a.count(text)) for a in answers]
    if not Path(spec).is_dir():
        raise ValueError(f"--reward '{spec}': not a folder; use a reward-model folder "
                         "(LlamaForSequenceClassification), 'refusal', or 'count:TEXT'")
    import reward
    rm = reward.load_reward_model(spec, device=device)
    rm_tok = data.load_tokenizer(spec)
    return lambda prompts, answers: reward.score_texts(rm, rm_tok, prompts, answers, batch_size)


# ----------------------------------------------------------------------------
# Degenerate samples, ranking, diversity: pure functions of lists

def repeat_share(ids, n: int = 4) -> float:
    """Share of the n-grams of `ids` that repeat an earlier n-gram (0 = none repeat)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def degenerate_reason(sample: dict, drop_truncated: bool, max_repeat: float = 0.5) -> str | None:
    """'empty', 'repetitive', 'truncated' or None for a generate() sample {"ids", "text", "finished"}."""
    if not sample["text"].strip():
        return "empty"
    if len(sample["ids"]) >= 16 and repeat_share(sample["ids"]) > max_repeat:
        return "repetitive"
    if drop_truncated and not sample["finished"]:
        return "truncated"
    return None


def select_local(scores, ok) -> list[tuple[int, int]]:
    """scores[i][j], ok[i][j] (not degenerate) -> [(i, j)]: the best allowed j
    of every prompt i, ties to the lowest j."""
    kept = []
    for i, (row, allowed) in enumerate(zip(scores, ok)):
        cands = [j for j in range(len(row)) if allowed[j]]
        if cands:
            kept.append((i, max(cands, key=lambda j: (row[j], -j))))
    return kept


def select_global(scores, ok, frac: float) -> list[tuple[int, int]]:
    """The top ceil(frac x n_allowed) allowed samples over all prompts, ties
    to the lower (i, j); returned in (i, j) order."""
    if not 0 < frac <= 1:
        raise ValueError(f"--keep-frac must be in (0, 1], got {frac}")
    cands = [(i, j) for i, row in enumerate(ok) for j, allowed in enumerate(row) if allowed]
    ranked = sorted(cands, key=lambda ij: (-scores[ij[0]][ij[1]], ij))
    return sorted(ranked[:math.ceil(frac * len(cands))])


def distinct_n(texts, n: int = 2) -> float:
    """Distinct-n (Li et al. 2016): distinct word n-grams / all word n-grams over the texts."""
    grams = [tuple(w[i:i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def summary(values) -> dict:
    return {"mean": statistics.fmean(values), "median": statistics.median(values)} if values else \
        {"mean": None, "median": None}


# ----------------------------------------------------------------------------
# One iteration's sampling, scoring and selection

def sample_and_select(policy, tok, prompts, reward_fn, args, seed: int):
    """Sample K answers per prompt, score, filter and rank them.
    Returns (records for samples.jsonl, kept [{prompt, response}], stats)."""
    t0 = time.time()
    samples = generation.generate(policy, tok, prompts, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p, num_samples=args.k,
                                  seed=seed, batch_size=args.gen_batch_size,
                                  progress=not args.quiet)  # [P][K] dicts
    t_sample = time.time() - t0
    flat = [s["text"] for row in samples for s in row]
    flat_scores = reward_fn([p for p in prompts for _ in range(args.k)], flat)
    scores = [flat_scores[i * args.k:(i + 1) * args.k] for i in range(len(prompts))]  # [P][K]
    reasons = [[degenerate_reason(s, args.drop_truncated, args.max_repeat) for s in row] for row in samples]
    ok = [[r is None for r in row] for row in reasons]
    kept = select_local(scores, ok) if args.rank == "local" else select_global(scores, ok, args.keep_frac or 1 / args.k)
    kept_set = set(kept)

    records = [{"prompt_index": i, "prompt": p, "answers": [s["text"] for s in samples[i]], "scores": scores[i],
                "finished": [s["finished"] for s in samples[i]], "dropped": reasons[i],
                "kept": [(i, j) in kept_set for j in range(args.k)]} for i, p in enumerate(prompts)]
    kept_data = [{"prompt": prompts[i], "response": samples[i][j]["text"]} for i, j in kept]
    kept_scores = [scores[i][j] for i, j in kept]
    all_reasons = [r for row in reasons for r in row if r]
    stats = {"prompts": len(prompts), "samples": len(flat), "kept": len(kept),
             "reward/all": summary(flat_scores), "reward/kept": summary(kept_scores),
             "distinct2/kept": distinct_n([d["response"] for d in kept_data]), "distinct2/all": distinct_n(flat),
             "dropped": len(all_reasons), "dropped_by": {r: all_reasons.count(r) for r in sorted(set(all_reasons))},
             "truncated": sum(not s["finished"] for row in samples for s in row),
             "sample_seconds": round(t_sample, 1), "score_seconds": round(time.time() - t0 - t_sample, 1)}
    return records, kept_data, stats


def write_jsonl(path: Path, rows):
    common.write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def sft_argv(args, ckpt, kept_file, out_dir, iteration: int) -> list[str]:
    """The sft.py command line of one iteration (its --seed differs per iteration)."""
    argv = ["--ckpt", str(ckpt), "--data", str(kept_file), "--out", str(out_dir), "--lr", str(args.sft_lr),
            "--epochs", str(args.sft_epochs), "--max-steps", str(args.sft_max_steps),
            "--batch-size", str(args.sft_batch_size), "--grad-accum", str(args.sft_grad_accum),
            "--max-len", str(args.sft_max_len), "--seed", str(args.seed + iteration), "--save-every", "0",
            "--log-every", str(args.sft_log_every), "--dtype", args.sft_dtype,
            "--overwrite"]  # an unfinished iteration (no finished marker) is redone from scratch
    if args.template:
        argv += ["--template", args.template]
    if args.system is not None:
        argv += ["--system", args.system]
    if args.lora_rank > 0:
        argv += ["--lora-rank", str(args.lora_rank)]
    if args.quiet:
        argv += ["--quiet"]
    return argv


# ----------------------------------------------------------------------------
# The loop

def build_parser():
    ap = argparse.ArgumentParser(description="RAFT: sample K answers, keep the best by reward, fine-tune, repeat.")
    ap.add_argument("--ckpt", default=model_lib.DEFAULT_CKPT, help="starting policy (HF folder or 'smollm2')")
    ap.add_argument("--prompts", required=True,
                    help="prompts: JSONL {prompt}, Alpaca JSON, safety-tuned-llamas {instructions: [...]}, .txt")
    ap.add_argument("--reward", required=True, help="reward-model folder, 'refusal' or 'count:TEXT'")
    ap.add_argument("--out", required=True)
    ap.add_argument("--k", type=int, default=8, help="samples per prompt")
    ap.add_argument("--iterations", type=int, default=1)
    ap.add_argument("--prompts-per-iter", type=int, default=500)
    ap.add_argument("--temperature", type=float, default=0.85)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-new-tokens", type=int, default=120)
    ap.add_argument("--gen-batch-size", type=int, default=64, help="rows (prompts x K) per generation batch")
    ap.add_argument("--rank", choices=("local", "global"), default="local")
    ap.add_argument("--keep-frac", type=float, default=None, help="--rank global: share kept (default 1/K)")
    ap.add_argument("--drop-truncated", action="store_true", help="drop answers cut by --max-new-tokens")
    ap.add_argument("--max-repeat", type=float, default=0.5, help="drop answers with more repeated 4-grams")
    ap.add_argument("--template", default=None, help=data.TEMPLATE_HELP)
    ap.add_argument("--system", default=None, help=data.SYSTEM_HELP)
    ap.add_argument("--reward-batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="skip finished iterations, continue from the last one")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    sft = ap.add_argument_group("fine-tuning step (passed to sft.py)")
    sft.add_argument("--sft-lr", type=float, default=2e-5)
    sft.add_argument("--sft-epochs", type=float, default=1.0)
    sft.add_argument("--sft-max-steps", type=int, default=0, help="> 0 overrides --sft-epochs")
    sft.add_argument("--sft-batch-size", type=int, default=8)
    sft.add_argument("--sft-grad-accum", type=int, default=1)
    sft.add_argument("--sft-max-len", type=int, default=512)
    sft.add_argument("--sft-dtype", choices=("fp32", "bf16", "auto"), default="fp32", help="sft.py's --dtype")
    sft.add_argument("--sft-log-every", type=int, default=10)
    sft.add_argument("--lora-rank", type=int, default=0, help="> 0: LoRA fine-tuning (merged on save)")
    return ap


def iteration_prompts(prompts, iteration: int, per_iter: int) -> list[str]:
    """Prompts of iteration 1, 2, ...: consecutive slices of the (shuffled) list, wrapping around."""
    start = (iteration - 1) * per_iter
    return [prompts[(start + n) % len(prompts)] for n in range(per_iter)]


def main(argv=None):
    """Run the iterations; returns the last checkpoint folder (tests call this in-process)."""
    import sft

    args = build_parser().parse_args(argv)
    if args.k < 1 or args.iterations < 1 or args.prompts_per_iter < 1:
        raise ValueError("--k, --iterations and --prompts-per-iter must be >= 1")
    out = Path(args.out)
    log_file = out / "raft_log.jsonl"
    finished = sorted(d.name for d in out.glob("iter_*") if common.is_finished(d))
    if finished and not args.resume:  # an unfinished iteration is simply redone
        raise FileExistsError(f"{out} already holds finished RAFT iterations {finished}; pass --resume to "
                              "continue from them, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    prompts = data.load_prompts(args.prompts)
    if not prompts:
        raise ValueError(f"{args.prompts}: no prompts")
    random.Random(args.seed).shuffle(prompts)
    config = {**vars(args), "n_prompts": len(prompts)}
    print(json.dumps(config, indent=2), flush=True)
    (out / "raft_config.json").write_text(json.dumps(config, indent=2))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reward_fn = make_reward(args.reward, device, args.reward_batch_size)
    old_log = [json.loads(line) for line in log_file.read_text().splitlines()] if log_file.is_file() else []

    ckpt, log = args.ckpt, []
    for it in range(1, args.iterations + 1):
        it_dir = out / f"iter_{it}"
        if args.resume and common.is_finished(it_dir):
            print(f"iteration {it}: {it_dir} is finished, skipping")
            lines = [r for r in old_log if r["iteration"] == it]
            if not lines and (it_dir / "raft_stats.json").is_file():  # killed before the log was written
                lines = [json.loads((it_dir / "raft_stats.json").read_text())]
            log += lines
            ckpt = it_dir
            continue
        batch = iteration_prompts(prompts, it, args.prompts_per_iter)
        policy = model_lib.load_model(ckpt, device=device)
        tok = data.load_tokenizer(ckpt, args.template, args.system)
        if it == 1:
            print(data.describe_template(tok), flush=True)
        records, kept, stats = sample_and_select(policy, tok, batch, reward_fn, args, seed=args.seed + it)
        del policy  # sft.py loads its own copy
        if not kept:
            raise RuntimeError(f"iteration {it}: every sample was degenerate ({stats['dropped_by']}); "
                               "nothing to fine-tune on. Check the model and --max-new-tokens/--max-repeat.")
        it_dir.mkdir(parents=True, exist_ok=True)
        write_jsonl(it_dir / "samples.jsonl", records)
        write_jsonl(it_dir / "kept.jsonl", kept)
        print(f"iteration {it}: reward all {stats['reward/all']['mean']:.4f} (median "
              f"{stats['reward/all']['median']:.4f}), kept {stats['reward/kept']['mean']:.4f} (median "
              f"{stats['reward/kept']['median']:.4f}); kept {stats['kept']}/{stats['samples']}, dropped "
              f"{stats['dropped']} {stats['dropped_by']}, distinct-2 of kept {stats['distinct2/kept']:.3f}",
              flush=True)
        t0 = time.time()
        # this iteration's log line, kept beside it: a kill after sft.py finished must not lose it
        line = {"iteration": it, **stats, "sft_seconds": None, "checkpoint": str(it_dir)}
        common.write_atomic(it_dir / "raft_stats.json", json.dumps(line))
        ckpt = Path(sft.main(sft_argv(args, ckpt, it_dir / "kept.jsonl", it_dir, it)))
        log.append({**line, "sft_seconds": round(time.time() - t0, 1), "checkpoint": str(ckpt)})
        common.write_atomic(it_dir / "raft_stats.json", json.dumps(log[-1]))
        write_jsonl(log_file, log)
    write_jsonl(log_file, log)
    return str(ckpt)


if __name__ == "__main__":
    common.cli(main)
