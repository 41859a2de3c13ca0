"""The main job, end to end: make SmolLM2-135M-Instruct safe on a laptop CPU.

    python pipeline.py                  # the full demo (17-32 minutes on 2 CPU cores, by the CPU: README)
    python pipeline.py --quick          # a smoke run: a few steps and prompts per stage (CI)

Stages, in order (each is the scripts' own command, called in-process; the
README shows each one to run alone):
  1. baseline  eval.py on the held-out demo prompts: the base model complies
  2. distill   the base model answers the ordinary training instructions and
               the benign prompts of the openings pairs (`distill` below): its
               own helpful answers become SIT targets and DPO's chosen answers
  3. sit       sft.py: safety instruction tuning on demo_data/sit_train.json
               plus the base model's answers to ordinary instructions
  4. dpo       dpo.py: sigmoid DPO, beta 0.1, on the openings (first 4 words,
               --opening-words 4) of demo_data/prefs_train.jsonl, the openings
               pairs, the ordinary pairs (base answer vs a refusal) and the
               midway pairs (the rest of a base answer vs a refusal, from inside
               it), with a KL anchor to the base model on the first 64 tokens
               of its own ordinary answers (--anchor-ckpt, --anchor-answer-tokens;
               docs/helpfulness.md)
  5. raft      raft.py: one best-of-K round scored by the offline refusal judge
  6. eval      eval.py on every stage's checkpoint, then one combined report
DPO and RAFT start from the SIT checkpoint. The base model never refuses (0 of
378 harmful prompts, eval.py), so RAFT has no refusal among its samples to
keep, and DPO's reference would give the hand-written chosen answers very low
likelihood; the DPO paper (Rafailov et al. 2023, sec. 4) makes the same move,
fine-tuning on preferred answers first when no SFT model of the data exists. A stage
whose output already exists is skipped, so an interrupted run resumes where it
stopped. Everything lands in --out (default runs/pipeline): one folder per
stage, and report/ with report.md, report.png and results.json.

Simplifications, on purpose: the demo data is small and hand-written
(demo_data/README.md), so the held-out demo prompts, not the paper's
benchmarks, are the default test set (`--paper-benchmarks` adds the three
benchmarks from ../shared/data when present, 60 of its AlpacaEval prompts
as ordinary instructions, and the paper grid's multiple-choice accuracy on 200
BoolQ, PIQA and OpenBookQA questions each); RAFT runs one short round with
a rule-based reward instead of a trained reward model.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

# Set before torch loads (the stage scripts import it): PyTorch then puts
# tensors of 2 MiB or more on transparent huge pages, far fewer page faults
# (docs/performance.md, "The allocator"). PyTorch reads it once.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import common as common_lib  # noqa: E402 (after the line above)
import data  # noqa: E402
import dpo  # noqa: E402
import eval as evaluation  # noqa: E402
import mcq  # noqa: E402
import paper  # noqa: E402
import raft  # noqa: E402
import sft  # noqa: E402

ROOT = Path(__file__).resolve().parent
DEMO = ROOT / "demo_data"
SHARED = ROOT.parent / "shared" / "data"
PAPER_BENCHMARKS = ["I-MaliciousInstructions.json", "I-CoNa.json", "I-Controversial.json"]
ALPACA_EVAL_PROMPTS = 60  # --paper-benchmarks's seeded sample of AlpacaEval (docs/helpfulness.md's held-out one)
MCQ_QUESTIONS = 200  # --paper-benchmarks's seeded sample of each MCQ file: the paper grid's (paper.SIZES["cpu"])

# Minutes each stage takes on 2 CPU cores (docs/helpfulness.md: DPO's 345 steps with the
# whole-answer anchor at its uncontended 2.4 s per step, times 0.89 for the anchor on 64
# answer tokens, bench/bench_dpo_anchor.py): the time-left estimate scales these by how
# fast this machine has been so far.
EXPECTED_MINUTES = {"baseline": 1.4, "distill": 2.3, "sit": 3.8, "dpo": 12.3, "raft": 1.6, "eval": 4.0}

# Stage settings: (full run, --quick smoke run).
SETTINGS = {
    "sit": (["--epochs", "2", "--lr", "3e-5", "--batch-size", "8", "--max-len", "256"],
            ["--max-steps", "2", "--batch-size", "2", "--max-len", "128"]),
    "dpo": (["--epochs", "3", "--lr", "8e-5", "--beta", "0.1", "--nll-weight", "1.0", "--batch-size", "8",
             "--max-len", "256"],
            ["--max-steps", "2", "--batch-size", "2", "--max-len", "128"]),
    "raft": (["--k", "4", "--prompts-per-iter", "48", "--max-new-tokens", "64", "--sft-epochs", "1"],
             ["--k", "2", "--prompts-per-iter", "2", "--max-new-tokens", "8", "--sft-max-steps", "1",
              "--sft-batch-size", "2"]),
}


class Clock:
    """Per-stage headers with elapsed time and an estimate of the time left."""

    def __init__(self, stages):
        self.stages, self.start, self.ran = stages, time.time(), {}  # ran: stage -> seconds it worked

    def header(self, i, name, what):
        self.stage_start = time.time()
        left = sum(EXPECTED_MINUTES[s] for s in self.stages[i:]) * 60
        if self.ran:  # this machine's speed relative to the reference run, from the stages that did work
            left *= sum(self.ran.values()) / (60 * sum(EXPECTED_MINUTES[s] for s in self.ran))
        print(f"\n=== [{i + 1}/{len(self.stages)}] {name}: {what}  "
              f"(elapsed {(time.time() - self.start) / 60:.1f} min, about {left / 60:.0f} min left)", flush=True)

    def finish(self, name):
        seconds = time.time() - self.stage_start
        if seconds > 5:  # not a stage found finished and skipped
            self.ran[name] = seconds


def read_jsonl(path) -> list[dict]:
    """A JSON-lines file's records (data.read_records, which checks each line, without their places)."""
    return [rec for _, rec in data.read_records(path)]


def run_eval(name: str, ckpt: str, out: Path, args) -> dict:
    """eval.py on one checkpoint into `out`; with --paper-benchmarks, mcq.json there first."""
    benches = [str(DEMO / "eval_harmful.jsonl")]
    ordinary = [str(DEMO / "ordinary_eval.jsonl"), str(DEMO / "ordinary_valid.jsonl")]
    if args.paper_benchmarks:
        benches += [str(SHARED / b) for b in PAPER_BENCHMARKS if (SHARED / b).is_file()]
        if (SHARED / "helpful_alpaca_eval.jsonl").is_file():  # written once, beside the stages' folders
            sample = out.parent / f"alpaca_eval{ALPACA_EVAL_PROMPTS}.jsonl"
            if not sample.is_file():
                prompts = read_jsonl(SHARED / "helpful_alpaca_eval.jsonl")
                sample.parent.mkdir(parents=True, exist_ok=True)
                raft.write_jsonl(sample, paper.sample(prompts, ALPACA_EVAL_PROMPTS, seed=0))
            ordinary.append(str(sample))
        mcq_files = [SHARED / f for f in paper.MCQ.values()]
        if all(f.is_file() for f in mcq_files) and not (out / "mcq.json").is_file():
            out.mkdir(parents=True, exist_ok=True)  # before results.json, so that a resumed run has both
            paper.mcq_scores(name, ckpt, out, 4 if args.quick else MCQ_QUESTIONS, seed=0)
    return evaluation.evaluate({name: ckpt}, benches, judge=evaluation.DEFAULT_JUDGE, out=out,
                               benign=[str(DEMO / "eval_benign.jsonl")], ordinary=ordinary,
                               max_new_tokens=8 if args.quick else 120, batch_size=32,
                               limit=3 if args.quick else None, resume=True)  # an eval killed mid-way goes on


def distill(base: str, out: Path, quick: bool):
    """The base model's own answers as training data, so that tuning keeps what it could do:
      * sit_train.json: demo_data/sit_train.json + the base model's answers to
        demo_data/ordinary_train.jsonl (unfinished answers cut after their last sentence);
      * prefs_ordinary.jsonl: the same prompts, chosen = that answer, rejected = a refusal
        (the hand-written over-refusals of prefs_train's benign pairs, in turn);
      * prefs_midway.jsonl: the same answers cut inside (midway_pairs), rejected = one of
        prefs_train's safe refusals of harmful prompts, in turn: no refusal glued into an answer;
      * ordinary_answers.jsonl: those answers alone, DPO's KL anchor (dpo.py --anchor-data);
      * prefs_openings.jsonl: demo_data's, with each benign pair's stock helpful opener
        ("Good question. Here's what you need to know.") replaced by how the base model itself
        begins its answer (24 new tokens; --opening-words 4 keeps the first 4 words): no stock
        openers to learn.
    Greedy, seed 0, so the files are the same on every run."""
    import generation
    import model as model_lib

    model, tok = model_lib.load_model(base), data.load_tokenizer(base)
    limit = 4 if quick else None
    ordinary = [r["prompt"] for r in read_jsonl(DEMO / "ordinary_train.jsonl")][:limit]
    outs = generation.generate(model, tok, ordinary, max_new_tokens=8 if quick else 160, batch_size=32,
                               progress=True)
    answers = []
    for o in outs:
        text = o[0]["text"].strip()
        if not o[0]["finished"]:  # keep whole sentences: an SFT target should end where an answer ends
            cut = max(text.rfind(". "), text.rfind(".\n"), text.rfind("\n"))
            text = text[:cut + 1].strip() if cut > 0 else text
        answers.append(text)
    keep = [(p, a) for p, a in zip(ordinary, answers) if a and not evaluation.is_refusal(a)]
    sit = json.loads((DEMO / "sit_train.json").read_text(encoding="utf-8"))
    sit += [{"instruction": p, "input": "", "output": a} for p, a in keep]
    prefs = read_jsonl(DEMO / "prefs_train.jsonl")
    refusals = [r["rejected"] for r in prefs if r["kind"] == "benign"]
    midway = midway_pairs(keep, [r["chosen"] for r in prefs if r["kind"] == "harmful"])
    pairs = [{"prompt": p, "chosen": a, "rejected": refusals[i % len(refusals)], "category": "ordinary",
              "kind": "ordinary"} for i, (p, a) in enumerate(keep)]
    openings = read_jsonl(DEMO / "prefs_openings.jsonl")
    benign = [r for r in openings if r["kind"] == "benign"][:limit]
    first = generation.generate(model, tok, [r["prompt"] for r in benign], max_new_tokens=24, batch_size=32,
                                progress=True)
    for r, o in zip(benign, first):
        text = o[0]["text"].strip()
        if text and not evaluation.is_refusal(text):
            r["chosen"] = text
    out.mkdir(parents=True, exist_ok=True)
    raft.write_jsonl(out / "prefs_ordinary.jsonl", pairs)
    raft.write_jsonl(out / "prefs_midway.jsonl", midway)
    raft.write_jsonl(out / "ordinary_answers.jsonl", [{"prompt": p, "response": a} for p, a in keep])
    raft.write_jsonl(out / "prefs_openings.jsonl", openings)
    common_lib.write_atomic(out / "sit_train.json", json.dumps(sit, ensure_ascii=False, indent=1) + "\n")
    common_lib.mark_finished(out)
    print(f"[distill] {len(keep)} of {len(ordinary)} ordinary answers kept; "
          f"{len(benign)} benign openings from the base model", flush=True)


def midway_pairs(answers, refusals, seed=0):
    """[(prompt, answer)] -> DPO pairs that start inside the answer: prefix = the
    answer up to a sentence end, a colon or a comma (one of its first four with
    4 words or more after it, seeded),
    chosen = the rest of the answer, rejected = a refusal (`refusals` in turn).
    Against refusal sentences glued into ordinary answers ("To make a shopping
    list, I must decline to provide a recipe."): the 4-word openings of the
    other pairs only teach how an answer begins."""
    import random
    import re

    pairs = []
    for i, (prompt, answer) in enumerate(answers):
        cuts = [m.end() for m in re.finditer(r"[.,!?:](?=\s)", answer) if len(answer[m.end():].split()) >= 4][:4]
        if not cuts:
            continue
        cut = random.Random(f"{seed}-{i}").choice(cuts)
        pairs.append({"prompt": prompt, "prefix": answer[:cut].strip(), "chosen": answer[cut:].strip(),
                      "rejected": refusals[i % len(refusals)], "category": "ordinary", "kind": "midway"})
    return pairs


def combine_reports(stage_dirs: dict, out: Path):
    """One results.json / report.md / report.png over every stage's own eval (and MCQ table)."""
    merged, gens, scores = None, [], {}
    for name, folder in stage_dirs.items():
        res = json.loads((folder / "results.json").read_text())
        if merged is None:
            merged = {"settings": dict(res["settings"], ckpts={}), "results": {}}
        merged["settings"]["ckpts"].update(res["settings"]["ckpts"])
        merged["results"].update(res["results"])
        gens += [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines()]
        if (folder / "mcq.json").is_file():
            scores[name] = json.loads((folder / "mcq.json").read_text())
    if scores:
        merged["mcq"] = scores
    evaluation.write_report(merged, out, gens, extra_lines=mcq_table(scores) if scores else ())
    return merged


def mcq_table(scores: dict) -> list[str]:
    """report.md's lines for {checkpoint: {task: mcq.evaluate's result}}: acc_norm with its 95%
    interval, and each later checkpoint's difference from the first (the base model) on the same
    questions, with a paired bootstrap interval (mcq.bootstrap_interval of the per-question differences)."""
    first = next(iter(scores))
    tasks = list(scores[first])
    lines = ["", f"Multiple choice, acc_norm % [95% interval]; difference from {first} on the same questions:", "",
             "| checkpoint | " + " | ".join(f"{t} (n={scores[first][t]['n']})" for t in tasks) + " |",
             "|---" * (len(tasks) + 1) + "|"]
    for name, per in scores.items():
        cells = []
        for t in tasks:
            r = per[t]
            cell = f"{100 * r['acc_norm']:.1f} [{100 * r['acc_norm_ci'][0]:.1f}, {100 * r['acc_norm_ci'][1]:.1f}]"
            if name != first:
                diff = [a - b for a, b in zip(r["hits_norm"], scores[first][t]["hits_norm"])]
                lo, hi = mcq.bootstrap_interval(diff)
                cell += f"; {100 * sum(diff) / len(diff):+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/pipeline")
    ap.add_argument("--ckpt", default="smollm2", help="the base model (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--quick", action="store_true", help="a few steps and prompts per stage (CI smoke run)")
    ap.add_argument("--paper-benchmarks", action="store_true",
                    help="also evaluate on I-MaliciousInstructions, I-CoNa, I-Controversial from ../shared/data, "
                         f"on {ALPACA_EVAL_PROMPTS} of its AlpacaEval prompts (ordinary instructions), and "
                         f"multiple-choice accuracy on {MCQ_QUESTIONS} of its BoolQ, PIQA, OpenBookQA questions each")
    ap.add_argument("--skip-raft", action="store_true")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "auto"), default="auto",
                    help="training precision (auto: bf16 autocast where the hardware multiplies bf16 natively, "
                         "e.g. CPUs with AVX512-BF16; generation and eval always run in fp32)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    q = int(args.quick)
    stages = ["baseline", "distill", "sit", "dpo"] + ([] if args.skip_raft else ["raft"]) + ["eval"]
    clock = Clock(stages)
    quiet = ["--quiet"] if args.quick else []
    ckpts = {"base": args.ckpt}
    evals = {}

    for i, stage in enumerate(stages):
        if stage == "baseline":
            clock.header(i, "baseline", "how often does the instruction-tuned model refuse?")
            evals["base"] = out / "eval_base"
            if not (evals["base"] / "results.json").is_file():
                run_eval("base", args.ckpt, evals["base"], args)
        elif stage == "distill":
            clock.header(i, "distill", "the base model answers ordinary instructions (SIT and DPO targets)")
            if not common_lib.is_finished(out / "distill"):
                distill(args.ckpt, out / "distill", args.quick)
        elif stage in ("sit", "dpo", "raft"):
            what = {"sit": "safety instruction tuning (SFT on safety demonstrations + instructions)",
                    "dpo": "direct preference optimisation on safe-vs-compliant pairs",
                    "raft": "reward-ranked fine-tuning: sample K, keep the best, fine-tune"}[stage]
            clock.header(i, stage, what)
            folder = out / stage
            if not common_lib.is_finished(folder / "iter_1" if stage == "raft" else folder):
                start = args.ckpt if stage == "sit" else ckpts["sit"]
                common = ["--ckpt", start, "--out", str(folder), "--seed", "0"] + quiet
                if stage != "raft" and (folder / "state" / "trainer.pt").is_file():
                    common.append("--resume")  # an interrupted stage continues from its last saved step
                elif stage != "raft" and folder.exists():
                    common.append("--overwrite")  # interrupted before its first save: redone
                elif stage == "raft" and folder.exists():
                    common.append("--resume")  # raft.py redoes the unfinished iteration
                if stage == "sit":
                    sft.main(common + ["--data", str(out / "distill" / "sit_train.json"), "--dtype", args.dtype]
                             + SETTINGS["sit"][q])
                elif stage == "dpo":
                    midway = out / "distill" / "prefs_midway.jsonl"  # empty in --quick: answers of 8 tokens
                    dpo.main(common + ["--data", str(DEMO / "prefs_train.jsonl"),
                                       "--data", str(out / "distill" / "prefs_openings.jsonl"),
                                       "--data", str(out / "distill" / "prefs_ordinary.jsonl")]
                             + (["--data", str(midway)] if midway.stat().st_size else [])
                             + ["--opening-words", "4",
                                # kept close to the base model on its own ordinary answers
                                "--anchor-data", str(out / "distill" / "ordinary_answers.jsonl"),
                                "--anchor-ckpt", args.ckpt, "--anchor-batch-size", "1", "--anchor-weight", "1.0",
                                "--anchor-answer-tokens", "64",
                                "--dtype", args.dtype]
                             + SETTINGS["dpo"][q])
                else:
                    raft.main(common + ["--prompts", str(DEMO / "raft_prompts.jsonl"), "--reward", "refusal",
                                        "--sft-dtype", args.dtype] + SETTINGS["raft"][q])
            ckpts[stage] = str(folder / "iter_1" if stage == "raft" else folder)
        else:
            clock.header(i, "eval", "every stage on the held-out prompts")
            for name, path in ckpts.items():
                if name == "base":
                    continue
                evals[name] = out / f"eval_{name}"
                if not (evals[name] / "results.json").is_file():
                    run_eval(name, path, evals[name], args)
        clock.finish(stage)

    merged = combine_reports(evals, out / "report")
    print(f"\n=== done in {(time.time() - clock.start) / 60:.1f} min; report: {out / 'report'}/report.md\n")
    print((out / "report" / "report.md").read_text())
    return merged


if __name__ == "__main__":
    sys.exit(main() and 0)
