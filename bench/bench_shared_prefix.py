"""What running a batch's shared beginning once saves, on the main job's own
batches: SmolLM2-135M, CPU, fp32, forward + backward (the optimiser step is
the same either way and left out).

    OMP_NUM_THREADS=2 python bench/bench_shared_prefix.py [--batches 8 --rounds 2]

Every row of a batch starts with the chat template's system prompt (SmolLM2's
is 20-odd tokens). Llama.forward finds the leading slots alike in every row
(model.TokenLayout) and runs them in row 0 only. Two batch kinds,
batch size 8 as in pipeline.py:
  dpo  demo_data/prefs_*.jsonl pair rows with --opening-words 4: a short
       prompt and two 4-word answers, so the system prompt is a third of the tokens;
  sit  demo_data/sit_train.json rows (prompt + whole answer, --max-len 256).
Each kind runs `shared` (as dpo.py and sft.py do) and `off` (the model's
switch `share_prefix = False`: every row computes its own copy; padding is
skipped in both), alternating, `--rounds` times over the same batches.
Prints tokens computed, seconds per batch (median over rounds of the total),
the ratio, and the largest difference of the summed answer log-probs (the two
must agree to float rounding).
Run nothing else meanwhile: two busy processes on 2 cores slow both many times over.
"""
import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import losses  # noqa: E402
import model as model_lib  # noqa: E402

DEMO = ROOT / "demo_data"


def batches(tok, kind, n, size=8, seed=0):
    if kind == "dpo":
        pairs = [p for f in ("prefs_train.jsonl", "prefs_openings.jsonl") for p in data.load_preferences(DEMO / f)]
        examples, _ = data.tokenize_pairs(tok, pairs, 256, opening_words=4)
        collate = data.collate_pairs
    else:
        examples, _ = data.tokenize_sft(tok, data.load_instructions(DEMO / "sit_train.json"), 256)
        collate = data.collate_sft
    random.Random(seed).shuffle(examples)
    return [collate(examples[i:i + size], tok.pad_id) for i in range(0, n * size, size)]


def tokens_computed(net, batch) -> int:
    """Tokens the layers run for this batch (the model's TokenLayout)."""
    layout = net.token_layout(batch["input_ids"], batch["attention_mask"].bool(), batch.get("segments"))
    return layout.num_tokens(batch["input_ids"])


def answer_logps(net, batch):
    """Summed log-prob of every trained token, after a backward pass through it."""
    hidden = net(batch["input_ids"], batch["attention_mask"], return_hidden=True, segments=batch.get("segments"))
    per_token = losses.response_token_logps(hidden, net.lm_head_weight, batch["input_ids"], batch["loss_mask"])
    total = per_token.sum()
    total.backward()
    return total.item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    tok = data.load_tokenizer(None)
    net = model_lib.load_model(None, dtype=torch.float32).train()
    for kind in ("dpo", "sit"):
        work = batches(tok, kind, a.batches)
        real = sum(int(b["attention_mask"].sum()) for b in work)
        computed = sum(tokens_computed(net, b) for b in work)
        answer_logps(net, work[0])  # warm-up
        seconds, logps = {"shared": [], "off": []}, {}
        for _ in range(a.rounds):
            for mode in ("shared", "off"):
                net.share_prefix = mode == "shared"
                t0 = time.perf_counter()
                logps[mode] = []
                for b in work:
                    net.zero_grad(set_to_none=True)
                    logps[mode].append(answer_logps(net, b))
                seconds[mode].append(time.perf_counter() - t0)
        net.share_prefix = True
        s, o = (statistics.median(seconds[m]) / len(work) for m in ("shared", "off"))
        diff = max(abs(x - y) for x, y in zip(logps["shared"], logps["off"]))
        print(f"{kind}: {len(work)} batches of 8, {real} real tokens, {computed} computed when shared "
              f"({computed / real:.2f}); off {o:.2f} s/batch, shared {s:.2f} s/batch: {o / s:.2f}x faster; "
              f"largest log-prob difference {diff:.2e}")


if __name__ == "__main__":
    main()
