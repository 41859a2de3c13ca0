"""The paper's experiments on the paper's data: SIT over n, DPO on PKU-SafeRLHF,
RAFT with a trained reward model, each checkpoint measured for safety and for
helpfulness.

    python paper.py                  # sizes for 2 CPU cores (SIZES["cpu"]; docs/paper.md says how long)
    python paper.py --sizes full     # the paper's sizes, for a GPU
    python paper.py --sizes quick    # a smoke run: a few steps and items per stage

Stages, each skipped when its folder holds a finished run (common.is_finished),
so an interrupted grid resumes where it stopped; each is one script's own
command (printed as it starts):
  data      seeded samples from ../shared/data into OUT/data/: the Alpaca subset
            for SIT, held-out Alpaca items with their answers (reference NLL),
            AlpacaEval prompts (ordinary instructions), XSTest's safe prompts
            (over-refusal), DPO's PKU pairs and RAFT's PKU prompts
  sit_nN    sft.py: the Alpaca subset + N Bianchi safety demonstrations, one
            epoch, the same seed for every N (N = 0 is the paper's Alpaca-tuned base)
  reward    reward.py: a Bradley-Terry reward model on PKU pairs (a probe on
            SmolLM2's 17 lowest layers, as docs/performance.md chose it)
  dpo       dpo.py from sit_n0: sigmoid, beta 0.1, on PKU pairs
  raft      raft.py from sit_n0: K samples per PKU prompt, the reward model's
            best kept, SFT
  eval_*    eval.py on every checkpoint: I-MaliciousInstructions, I-CoNa,
            I-Controversial (--judge, by default the shipped learned judge, and the
            reward model's median), XSTest safe
            prompts (over-refusal), AlpacaEval prompts (refusals, degenerate
            answers), Alpaca references (NLL); mcq.py on BoolQ, PIQA, OpenBookQA
  report    OUT/report/: report.md (the table, with 95% bootstrap intervals
            over items), sit_curve.png, results.json
The base model is the embedded SmolLM2-135M-Instruct unless --ckpt says otherwise.
"""
import argparse
import csv
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as pipeline.py: before torch loads

import common  # noqa: E402
import data  # noqa: E402
import dpo  # noqa: E402
import eval as evaluation  # noqa: E402
import mcq  # noqa: E402
import model as model_lib  # noqa: E402
import raft  # noqa: E402
import reward  # noqa: E402
import sft  # noqa: E402

SHARED = Path(__file__).resolve().parent.parent / "shared" / "data"
HARMFUL = ["I-MaliciousInstructions.json", "I-CoNa.json", "I-Controversial.json"]
MCQ = {"boolq": "mcq_boolq_dev.jsonl", "piqa": "mcq_piqa_valid.jsonl", "openbookqa": "mcq_obqa_test.jsonl"}

# None: every item the file has.
SIZES = {
    "cpu": {"alpaca": 600, "n_safety": [0, 100, 300, 1000], "dpo_pairs": 600, "rm_pairs": 1000,
            "rm_eval_pairs": 300, "raft_prompts": 48, "raft_k": 4, "raft_tokens": 120, "harmful": 100,
            "benign": 60, "ordinary": 40, "references": 40, "mcq": 200, "max_steps": 0, "rm_layers": 17},
    # full: 4,500 of the shared 5,000 Alpaca instructions; the rest give the reference answers
    "full": {"alpaca": 4500, "n_safety": [0, 100, 300, 500, 1000, 1500, 2000], "dpo_pairs": None,
             "rm_pairs": 2000, "rm_eval_pairs": 1000, "raft_prompts": 500, "raft_k": 8, "raft_tokens": 120,
             "harmful": None, "benign": None, "ordinary": None, "references": 200, "mcq": None, "max_steps": 0,
             "rm_layers": 17},
    "quick": {"alpaca": 16, "n_safety": [0, 4], "dpo_pairs": 8, "rm_pairs": 16, "rm_eval_pairs": 8,
              "raft_prompts": 2, "raft_k": 2, "raft_tokens": 8, "harmful": 2, "benign": 2, "ordinary": 2,
              "references": 2, "mcq": 4, "max_steps": 2, "rm_layers": 1},
}
# Minutes per stage on 2 CPU cores at SIZES["cpu"] (docs/paper.md's run; "sit" the mean of
# the four), for the time-left estimate.
EXPECTED_MINUTES = {"data": 0.1, "sit": 5.8, "reward": 2.4, "dpo": 7.2, "raft": 2.0, "eval": 5.5, "report": 0.1}


def sample(items, n, seed):
    """A seeded sample of n items in their file order (all of them when n is None or larger)."""
    if n is None or n >= len(items):
        return list(items)
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), n))]


def prepare_data(out: Path, size: dict, seed: int):
    """The grid's own samples of the shared data, written once (what every stage reads)."""
    alpaca = json.loads((SHARED / "alpaca_5000.json").read_text(encoding="utf-8"))
    order = random.Random(seed).sample(range(len(alpaca)), len(alpaca))
    train = [alpaca[i] for i in sorted(order[:size["alpaca"]])]
    rest = [alpaca[i] for i in sorted(order[size["alpaca"]:]) if not alpaca[i]["input"]]  # never trained on
    refs = [{"prompt": a["instruction"], "reference": a["output"]} for a in rest[:size["references"]]]
    with open(SHARED / "xstest_human_labels_3models.csv", newline="", encoding="utf-8") as f:
        # XSTest's 250 safe prompts: every type but contrast_* (their unsafe twins)
        safe = sorted({row["prompt"] for row in csv.DictReader(f) if not row["type"].startswith("contrast_")})
    ordinary = [r for _, r in data.read_records(SHARED / "helpful_alpaca_eval.jsonl")]
    pku = [r for _, r in data.read_records(SHARED / "pku_saferlhf_pairs.jsonl")]
    pairs = sample(pku, size["dpo_pairs"], seed)
    prompts = sorted({p["prompt"] for p in pku})
    unused = sorted(set(prompts) - {p["prompt"] for p in pairs})  # RAFT's prompts: not DPO's, while there are enough
    raft_prompts = sample(unused if len(unused) >= size["raft_prompts"] else prompts, size["raft_prompts"], seed)
    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    common.write_atomic(folder / "alpaca_train.json", json.dumps(train, ensure_ascii=False, indent=1) + "\n")
    raft.write_jsonl(folder / "alpaca_reference.jsonl", refs)
    raft.write_jsonl(folder / "xstest_safe.jsonl", [{"prompt": p} for p in sample(safe, size["benign"], seed)])
    raft.write_jsonl(folder / "alpaca_eval.jsonl", sample(ordinary, size["ordinary"], seed))
    raft.write_jsonl(folder / "dpo_pairs.jsonl", pairs)
    raft.write_jsonl(folder / "raft_prompts.jsonl", [{"prompt": p} for p in raft_prompts])
    for name in HARMFUL:  # I-Controversial has 40 prompts, I-MaliciousInstructions 100, I-CoNa 178
        prompts = sample(data.load_prompts(SHARED / name), size["harmful"], seed)
        raft.write_jsonl(folder / (Path(name).stem + ".jsonl"), [{"prompt": p} for p in prompts])
    common.mark_finished(folder, alpaca_train=len(train), references=len(refs), dpo_pairs=len(pairs),
                         raft_prompts=len(raft_prompts))


def stages(size) -> list[str]:
    sit = [f"sit_n{n}" for n in size["n_safety"]]
    models = ["base"] + sit + ["dpo", "raft"]
    return ["data"] + sit + ["reward", "dpo", "raft"] + [f"eval_{m}" for m in models] + ["report"]


def kind_of(stage: str) -> str:
    return stage.split("_")[0]


def run_stage(stage, out: Path, size: dict, args, ckpts: dict):
    """One stage of the grid: the scripts' own main, called in-process."""
    d, steps = out / "data", ["--max-steps", str(size["max_steps"])] if size["max_steps"] else []
    folder = out / stage
    again = ["--resume"] if (folder / "state" / "trainer.pt").is_file() else \
        ["--overwrite"] if folder.exists() else []  # an interrupted training run continues or is redone
    quiet = ["--quiet"] if args.sizes == "quick" else []
    common_args = ["--seed", str(args.seed), "--dtype", args.dtype] + quiet
    if stage == "data":
        prepare_data(out, size, args.seed)
    elif kind_of(stage) == "sit":
        n = int(stage.removeprefix("sit_n"))
        mix = ["--safety-data", str(SHARED / "safety_only_data_Instructions.json"), "--n-safety", str(n)] if n else []
        argv = ["--ckpt", args.ckpt, "--data", str(d / "alpaca_train.json"), *mix, "--out", str(folder),
                "--epochs", "1", "--lr", "3e-5", "--batch-size", "8", "--max-len", "256"]
        sft.main(argv + common_args + steps + again)
    elif stage == "reward":
        argv = ["--ckpt", args.ckpt, "--data", str(SHARED / "pku_saferlhf_pairs.jsonl"), "--out", str(folder),
                "--layers", str(size["rm_layers"]), "--train-layers", "0", "--head-l2", "0.03", "--train-pairs", str(size["rm_pairs"]),
                "--eval-pairs", str(size["rm_eval_pairs"]), "--seed", str(args.seed)]
        reward.main(argv)
    elif stage == "dpo":
        argv = ["--ckpt", ckpts["sit_n0"], "--data", str(d / "dpo_pairs.jsonl"), "--out", str(folder),
                "--beta", "0.1", "--loss", "sigmoid", "--lr", "2e-5", "--epochs", "1", "--batch-size", "8",
                "--max-len", "256"]
        dpo.main(argv + common_args + steps + again)
    elif stage == "raft":
        sft_steps = ["--sft-max-steps", str(size["max_steps"])] if size["max_steps"] else []
        argv = ["--ckpt", ckpts["sit_n0"], "--prompts", str(d / "raft_prompts.jsonl"), "--reward", str(out / "reward"),
                "--out", str(folder), "--k", str(size["raft_k"]), "--prompts-per-iter", str(size["raft_prompts"]),
                "--max-new-tokens", str(size["raft_tokens"]), "--sft-dtype", args.dtype, "--seed", str(args.seed),
                "--sft-max-len", "256"] + sft_steps + quiet + (["--resume"] if folder.exists() else [])
        raft.main(argv)
    elif kind_of(stage) == "eval":
        name = stage.removeprefix("eval_")
        evaluate_checkpoint(name, ckpts[name], out, folder, size, args)


def evaluate_checkpoint(name, path, out: Path, folder: Path, size: dict, args):
    """eval.py's benchmarks, then mcq.py's, into `folder` (results.json, mcq.json)."""
    d = out / "data"
    evaluation.evaluate({name: path}, [str(d / (Path(b).stem + ".jsonl")) for b in HARMFUL],
                        judge=[args.judge, f"reward:{out / 'reward'}"], out=folder,
                        benign=[str(d / "xstest_safe.jsonl")],
                        ordinary=[str(d / "alpaca_eval.jsonl"), str(d / "alpaca_reference.jsonl")],
                        max_new_tokens=8 if args.sizes == "quick" else 120, batch_size=32, seed=args.seed,
                        resume=True)
    mcq_scores(name, path, folder, size["mcq"], args.seed)
    common.mark_finished(folder)


def mcq_scores(name, path, folder: Path, n, seed) -> dict:
    """mcq.py on the grid's BoolQ, PIQA and OpenBookQA files (MCQ), n seeded questions of
    each (None: all), into folder/mcq.json; also what pipeline.py --paper-benchmarks runs."""
    model, tok = model_lib.load_model(path), data.load_tokenizer(path)
    scores = {task: mcq.evaluate(model, tok, SHARED / file, task, n, batch_size=8, seed=seed)
              for task, file in MCQ.items()}
    for task, r in scores.items():
        print(f"[mcq] {name} {task}: acc {r['acc']:.3f} acc_norm {r['acc_norm']:.3f} (n={r['n']}, "
              f"{r['items_per_s']} questions/s)", flush=True)
    common.write_atomic(folder / "mcq.json", json.dumps(scores, indent=1) + "\n")
    return scores


def rate_with_interval(records, key, seed) -> dict:
    """% of records whose `key` holds, and its 95% bootstrap interval over items."""
    hits = [bool(key(r)) for r in records]
    lo, hi = mcq.bootstrap_interval(hits, seed=seed)
    return {"rate": 100 * sum(hits) / len(hits), "ci": [100 * lo, 100 * hi], "n": len(hits)}


def collect(out: Path, models, seed) -> dict:
    """Per checkpoint: every rate with its interval, reward medians, NLL and MCQ, from the eval folders."""
    table = {}
    for m in models:
        folder = out / f"eval_{m}"
        res = json.loads((folder / "results.json").read_text())["results"][m]
        gens = [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines()]
        row = {}
        for bench in [Path(b).stem for b in HARMFUL]:
            recs = [g for g in gens if g["benchmark"] == bench]
            row[bench] = rate_with_interval(recs, lambda r: r["verdict"] == "safe", seed)
            row[bench]["median_reward"] = res[bench].get("median_reward")
        recs = [g for g in gens if g["benchmark"] == "xstest_safe"]
        row["xstest_safe_refused"] = rate_with_interval(recs, lambda r: r["refused"], seed)
        recs = [g for g in gens if g["benchmark"] == "alpaca_eval"]
        row["alpaca_eval_refused"] = rate_with_interval(recs, lambda r: r["refused"], seed)
        row["alpaca_eval_degenerate"] = rate_with_interval(recs, lambda r: r["degenerate"], seed)
        row["reference_nll"] = res["alpaca_reference"].get("reference_nll")
        row["mcq"] = json.loads((folder / "mcq.json").read_text())
        table[m] = row
    return table


def write_report(out: Path, size: dict, models, seed):
    """report.md (one table shaped like the paper's), sit_curve.png, results.json."""
    table = collect(out, models, seed)
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)

    def cell(x):
        return f"{x['rate']:.1f} ({x['ci'][0]:.0f}-{x['ci'][1]:.0f})"

    benches = [Path(b).stem for b in HARMFUL]
    head = ([f"{b} % safe ↑" for b in benches] + [f"{b} reward median ↑" for b in benches]
            + ["XSTest safe % refused ↓", "AlpacaEval % refused ↓", "AlpacaEval % degenerate ↓",
               "Alpaca reference NLL ↓"] + [f"{t} acc / acc_norm ↑" for t in MCQ])
    lines = ["| checkpoint | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for m in models:
        r = table[m]
        cells = [cell(r[b]) for b in benches] + [f"{r[b]['median_reward']:.2f}" for b in benches]
        cells += [cell(r["xstest_safe_refused"]), cell(r["alpaca_eval_refused"]), cell(r["alpaca_eval_degenerate"]),
                  f"{r['reference_nll']:.3f}"]
        for t in MCQ:
            q = r["mcq"][t]
            cells.append(f"{100 * q['acc']:.1f} / {100 * q['acc_norm']:.1f} "
                         f"({100 * q['acc_norm_ci'][0]:.0f}-{100 * q['acc_norm_ci'][1]:.0f})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    n_mcq = {t: table[models[0]]["mcq"][t]["n"] for t in MCQ}
    judges = sorted({j for m in models for j in json.loads((out / f"eval_{m}" / "results.json").read_text())
                     ["settings"]["judges"]})
    md = ["# The paper's grid", "", f"Sizes: {json.dumps(size)}; MCQ items: {json.dumps(n_mcq)}.",
          f"Judges: {', '.join(judges)} (the refusal judge makes % safe and % refused).",
          "Rates in %, with 95% bootstrap intervals over items in brackets (for MCQ: acc_norm's).", "",
          *lines, ""]
    common.write_atomic(folder / "report.md", "\n".join(md))
    common.write_atomic(folder / "results.json", json.dumps({"sizes": size, "table": table}, indent=1) + "\n")
    plot_curve(table, size, folder / "sit_curve.png")
    return table


def plot_curve(table, size, path):
    """% safe per harmful benchmark and acc_norm per MCQ task, against n."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = size["n_safety"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for bench in [Path(x).stem for x in HARMFUL]:
        rates = [table[f"sit_n{n}"][bench] for n in ns]
        a.errorbar(ns, [r["rate"] for r in rates], yerr=[[r["rate"] - r["ci"][0] for r in rates],
                                                         [r["ci"][1] - r["rate"] for r in rates]],
                   marker="o", capsize=3, label=bench)
    a.set(xlabel="safety demonstrations n", ylabel="% safe", title="SIT: safety against n", ylim=(0, 100))
    a.legend(fontsize=8)
    for t in MCQ:
        q = [table[f"sit_n{n}"]["mcq"][t] for n in ns]
        b.errorbar(ns, [100 * x["acc_norm"] for x in q],
                   yerr=[[100 * (x["acc_norm"] - x["acc_norm_ci"][0]) for x in q],
                         [100 * (x["acc_norm_ci"][1] - x["acc_norm"]) for x in q]], marker="o", capsize=3, label=t)
    b.set(xlabel="safety demonstrations n", ylabel="acc_norm %", title="SIT: helpfulness against n")
    b.legend(fontsize=8)
    fig.tight_layout()
    with common.replacing(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/paper")
    ap.add_argument("--ckpt", default=model_lib.DEFAULT_CKPT, help="the base model (default: embedded SmolLM2)")
    ap.add_argument("--sizes", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("fp32", "bf16", "auto"), default="auto")
    ap.add_argument("--judge", default=evaluation.DEFAULT_JUDGE,
                    help="the refusal judge of the safety and refusal columns (eval.py --judge; default: the "
                         "shipped learned judge, docs/judge.md); the reward model's medians come with it")
    args = ap.parse_args(argv)
    missing = [f for f in ["alpaca_5000.json", "safety_only_data_Instructions.json", "pku_saferlhf_pairs.jsonl",
                           "helpful_alpaca_eval.jsonl", "xstest_human_labels_3models.csv", *HARMFUL, *MCQ.values()]
               if not (SHARED / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{SHARED}: missing {missing}; see README 'The paper's experiments' for where "
                                "each file comes from")
    out, size = Path(args.out), SIZES[args.sizes]
    plan = stages(size)
    models = ["base"] + [f"sit_n{n}" for n in size["n_safety"]] + ["dpo", "raft"]
    ckpts = {"base": args.ckpt, **{m: str(out / m) for m in models[1:-1]}, "raft": str(out / "raft" / "iter_1")}
    clock_start, done_minutes = time.time(), 0.0
    for i, stage in enumerate(plan):
        finished = common.is_finished(out / ("raft/iter_1" if stage == "raft" else stage))
        if stage != "report" and finished:
            print(f"=== [{i + 1}/{len(plan)}] {stage}: finished, skipped", flush=True)
            continue
        elapsed = time.time() - clock_start
        left = sum(EXPECTED_MINUTES[kind_of(s)] for s in plan[i:])
        if done_minutes >= 1:  # this machine's speed against the reference run, once there is some to go by
            left *= elapsed / 60 / done_minutes
        print(f"\n=== [{i + 1}/{len(plan)}] {stage}  (elapsed {elapsed / 60:.1f} min, about {left:.0f} min left)",
              flush=True)
        if stage == "report":
            write_report(out, size, models, args.seed)
        else:
            run_stage(stage, out, size, args, ckpts)
        done_minutes += EXPECTED_MINUTES[kind_of(stage)]
    print(f"\n=== done in {(time.time() - clock_start) / 60:.1f} min; report: {out / 'report'}/report.md\n")
    print((out / "report" / "report.md").read_text())


if __name__ == "__main__":
    common.cli(main)
