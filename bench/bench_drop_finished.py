"""Greedy answering with finished rows dropped from the batch, against keeping them, one run.

    python bench/bench_drop_finished.py --ckpt runs/pipeline/sit [--repeats 2]

The eval stage's own work: greedy answers, 120 new tokens, batches of 32, to
the demo data's held-out prompts (the harmful, benign and ordinary files that
pipeline.py evaluates), one generate() call per file as eval.py makes them.
Each side runs `repeats` times, alternating; the median is reported. The
answers of both sides must be equal (the script stops otherwise). The gain
depends on the checkpoint: a model that refuses in one sentence (SIT) leaves
most rows finished early, one that writes to the token limit (the base
model) leaves none.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import generation  # noqa: E402
import model as model_lib  # noqa: E402

FILES = ["eval_harmful", "eval_benign", "ordinary_eval", "ordinary_valid"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="smollm2")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    model, tok = model_lib.load_model(args.ckpt), data.load_tokenizer(args.ckpt)
    sets = [data.load_prompts(ROOT / "demo_data" / f"{f}.jsonl") for f in FILES]  # eval.py's reader

    def answer(drop):
        return [generation.generate(model, tok, prompts, max_new_tokens=120, batch_size=32, drop_finished=drop)
                for prompts in sets]

    times, answers = {True: [], False: []}, {}
    for _ in range(args.repeats):
        for drop in (False, True):
            t = time.perf_counter()
            answers[drop] = answer(drop)
            times[drop].append(time.perf_counter() - t)
    if answers[True] != answers[False]:
        sys.exit("the answers differ with and without dropping finished rows")
    rows = [r[0] for per_file in answers[True] for r in per_file]
    print(f"{args.ckpt}: {len(rows)} answers, {sum(r['finished'] for r in rows)} finished before 120 tokens; "
          f"answers equal")
    kept, dropped = statistics.median(times[False]), statistics.median(times[True])
    print(f"keeping finished rows {kept:.1f} s, dropping them {dropped:.1f} s (median of {args.repeats}): "
          f"{kept / dropped:.2f}x")


if __name__ == "__main__":
    main()
