"""Where the main job's DPO step spends its time: the pair batch, and the KL
anchor's one ordinary answer (dpo.py --anchor-data), on the pipeline's own
data and SIT checkpoint, forward + backward under bf16 autocast as the
pipeline trains on a CPU with bf16 (no optimiser step: it is the same for all).

    python pipeline.py                      # once: runs/pipeline/{distill,sit}
    OMP_NUM_THREADS=2 python bench/bench_dpo_anchor.py [--run runs/pipeline --steps 8 --cut 64]

  pairs        the step's 8 pairs alone (data.collate_pairs, chunked log-probs)
  anchor       the anchor's answer alone (its own forward, losses.top_k_kl)
  anchor-body  the same forward and backward with a trivial loss: what the
               30 blocks cost without the full-vocabulary head and the KL
  separate     pairs, then anchor: dpo.py's step
  joined       the anchor's row inside the pairs' forward (both right-padded
               to one length, the anchor row in segment 0), one backward: the
               same losses, one pass through the weights instead of two
  anchor-cut   the anchor on its answer's first --cut tokens (dpo.py
               --anchor-answer-tokens, the pipeline's 64)
  separate-cut pairs, then anchor-cut: the pipeline's step

The anchor's KL targets are the SIT model's own top-64 distributions (what
they hold does not change the cost). Prints seconds per step (median of the
rounds) and the shares. Run nothing else meanwhile.
"""
import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import dpo  # noqa: E402
import losses  # noqa: E402
import model as model_lib  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/pipeline", help="a finished pipeline.py run")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cut", type=int, default=64, help="anchor-cut's answer tokens")
    args = ap.parse_args()
    run = Path(args.run)
    distill = run / "distill"
    tok = data.load_tokenizer(str(run / "sit"))
    files = [Path(__file__).resolve().parent.parent / "demo_data" / "prefs_train.jsonl"] + \
        [distill / f for f in ("prefs_openings.jsonl", "prefs_ordinary.jsonl", "prefs_midway.jsonl")]
    pairs = [p for f in files for p in data.load_preferences(f, {})]
    train, _ = data.tokenize_pairs(tok, pairs, 256, [4] * len(pairs))
    anchor, _ = data.tokenize_sft(tok, data.load_instructions(distill / "ordinary_answers.jsonl", {}), 256)
    sets = {False: anchor, True: dpo.cut_answers(anchor, args.cut)}  # whole answers, and their first --cut tokens
    net = model_lib.load_model(str(run / "sit"), dtype=torch.float32).train()
    weight = net.lm_head_weight
    rng = random.Random(0)
    plan = [(rng.sample(range(len(train)), 8), rng.randrange(len(anchor))) for _ in range(args.steps)]
    targets = {cut: {} for cut in sets}  # cut -> example index -> the SIT model's top-64 distributions
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _, a in plan:
            for cut, examples in sets.items():
                hidden, _ = dpo.anchor_hidden(net, data.collate_sft([examples[a]], tok.pad_id), "cpu")
                targets[cut][a] = losses.top_k_distribution(hidden, weight, 64)

    def pair_loss(hidden, batch):  # [b, T, H] -> a DPO-like scalar (the cost is the log-probs')
        per_token = losses.response_token_logps(hidden, weight, batch["input_ids"], batch["loss_mask"], "chunked")
        chosen = losses.reduce_sequence(per_token, batch["chosen_mask"])
        rejected = losses.reduce_sequence(per_token, batch["rejected_mask"])
        return -F.logsigmoid(0.1 * (chosen - rejected)).mean()

    def pairs_only(rows, a):
        batch = data.collate_pairs([train[i] for i in rows], tok.pad_id)
        pair_loss(net(batch["input_ids"], batch["attention_mask"], return_hidden=True,
                      segments=batch["segments"]), batch).backward()

    def anchor_only(rows, a, kl=True, cut=False):
        hidden, _ = dpo.anchor_hidden(net, data.collate_sft([sets[cut][a]], tok.pad_id), "cpu")
        (losses.top_k_kl(hidden, weight, *targets[cut][a]).mean() if kl else hidden.float().pow(2).mean()).backward()

    def separate(rows, a, cut=False):
        anchor_only(rows, a, cut=cut)
        pairs_only(rows, a)

    def joined(rows, a):
        pb, sb = data.collate_pairs([train[i] for i in rows], tok.pad_id), data.collate_sft([anchor[a]], tok.pad_id)
        T = max(pb["input_ids"].shape[1], sb["input_ids"].shape[1])
        pad = lambda t, v: F.pad(t, (0, T - t.shape[1]), value=v)  # noqa: E731  [b, t] -> [b, T]
        ids = torch.cat([pad(pb["input_ids"], tok.pad_id), pad(sb["input_ids"], tok.pad_id)])
        att = torch.cat([pad(pb["attention_mask"], 0), pad(sb["attention_mask"], 0)])
        seg = torch.cat([pad(pb["segments"], -1), pad(torch.where(sb["attention_mask"].bool(), 0, -1), -1)])
        hidden = net(ids, att, return_hidden=True, segments=seg)  # [b + 1, T, H]
        b = len(rows)
        anchor_hidden, _ = losses.response_hidden(hidden[b:, :sb["input_ids"].shape[1]], sb["loss_mask"])
        kl = losses.top_k_kl(anchor_hidden, weight, *targets[False][a]).mean()
        (pair_loss(hidden[:b, :pb["input_ids"].shape[1]], pb) + kl).backward()

    paths = {"pairs": pairs_only, "anchor": anchor_only, "anchor-body": lambda r, a: anchor_only(r, a, kl=False),
             "separate": separate, "joined": joined, "anchor-cut": lambda r, a: anchor_only(r, a, cut=True),
             "separate-cut": lambda r, a: separate(r, a, cut=True)}
    times = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, step in paths.items():
            for rows, a in plan:
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    step(rows, a)
                times[name].append(time.perf_counter() - t0)
                net.zero_grad(set_to_none=True)
    s = {name: statistics.median(t) for name, t in times.items()}
    tokens = statistics.mean(len(anchor[a]["input_ids"]) for _, a in plan)
    print(f"{args.steps} steps x {args.rounds} rounds, anchor answers {tokens:.0f} tokens on average, "
          f"{torch.get_num_threads()} threads")
    for name, value in s.items():
        print(f"  {name:12s} {value:.2f} s/step")
    print(f"anchor share of a step: {s['anchor'] / s['separate']:.2f}; its head and KL: "
          f"{(s['anchor'] - s['anchor-body']) / s['anchor']:.2f} of it; joined / separate: "
          f"{s['joined'] / s['separate']:.2f}")
    print(f"anchor on the first {args.cut} tokens: anchor-cut / anchor {s['anchor-cut'] / s['anchor']:.2f}, "
          f"separate-cut / separate {s['separate-cut'] / s['separate']:.2f}")


if __name__ == "__main__":
    main()
