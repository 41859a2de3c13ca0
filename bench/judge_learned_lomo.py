"""Leave-one-model-out check of the learned refusal judge on XSTest's human labels.

    python bench/judge_learned_lomo.py [--labels ../shared/data/xstest_human_labels_3models.csv]

For each of the three annotated models: the depth (blocks of SmolLM2 read),
how many of the answer's first tokens are averaged (32, 160, or both
averages side by side), the L2 penalty, and
whether the patterns' verdict joins the features (the combined judge) are
chosen by leave-one-model-out on the other two models alone, the probe is
fitted on those two, and it is scored on the held-out model, which played no
part in any choice. The patterns' verdict in a fold is that of the rules
bench/judge_rule_selection.py keeps without the held-out model. Prints each
fold's agreement with the humans and, on the unsafe prompts (contrast_*
types), the refusal rate as the humans and as the judge count it; then the
same for the patterns alone. All features come from one forward pass per
batch (eval.answer_feature_grid); --cache FILE keeps them for a second run.

--extra FILE...: labelled completions of other models (JSONL, judge_check's
format) that join the fitting rows of every fit, inner ones included, and are
never scored. --check FILE...: labelled completions scored by each fold's
probe, and used for nothing else. Their features are computed each run.
"""
import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import eval as ev  # noqa: E402
import judge_check  # noqa: E402
from judge_rule_selection import rule_selection  # noqa: E402

DEPTHS, ANSWER_TOKENS, L2S = (8, 16, 24), (32, 160), (0.001, 0.01, 0.03, 0.1)


def judged(probe, x, explicit, claim):
    """eval.learned_verdicts's rule on tensors (explicit, claim precomputed: they do not change between fits)."""
    return ((judge_check.probe_logits(probe, x) > 0) & ~claim) | explicit


def agreement(probe, x, refused, explicit, claim):
    return (judged(probe, x, explicit, claim) == refused).double().mean().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--labels", default=str(ROOT.parent / "shared" / "data" / "xstest_human_labels_3models.csv"))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--cache", help="a .safetensors file: features read from it when present, else written to it")
    ap.add_argument("--rules", action="store_true",
                    help="an explicit refusal in the answer's opening (eval.explicit_refusal) is a refusal, "
                         "an answer that opens with the claim asked for (eval.restates_claim) is not, "
                         "whatever the probe says: the judge eval.py ships")
    ap.add_argument("--extra", nargs="+", default=[], help="labelled files whose rows join every fit")
    ap.add_argument("--check", nargs="+", default=[], help="labelled files each fold's probe is scored on")
    args = ap.parse_args()
    rows = judge_check.read_labelled(args.labels)
    extra = [r for f in args.extra for r in judge_check.read_labelled(f)]
    checks = {f: judge_check.read_labelled(f) for f in args.check}
    others = extra + [r for c in checks.values() for r in c]  # after the labelled file's rows, in this order
    tok = data.load_tokenizer("smollm2")
    cached = load_file(args.cache) if args.cache and Path(args.cache).is_file() else {}
    grid = {tuple(map(int, key.split("_"))): x.double() for key, x in cached.items()}  # "8_32" -> (8, 32)
    if not grid:
        t0 = time.time()
        net = ev.load_backbone("smollm2", max(DEPTHS))
        grid = ev.answer_feature_grid(net, tok, [r["prompt"] for r in rows], [r["completion"] for r in rows],
                                      DEPTHS, ANSWER_TOKENS, args.batch_size)
        print(f"features after {DEPTHS} blocks, first {ANSWER_TOKENS} answer tokens: {time.time() - t0:.0f}s",
              flush=True)
    if args.cache and not cached:
        save_file({f"{d}_{n}": x.contiguous() for (d, n), x in grid.items()}, args.cache)
    if others:
        net = ev.load_backbone("smollm2", max(DEPTHS))
        more = ev.answer_feature_grid(net, tok, [r["prompt"] for r in others], [r["completion"] for r in others],
                                      DEPTHS, ANSWER_TOKENS, args.batch_size)
        grid = {key: torch.cat([x, more[key].double()]) for key, x in grid.items()}
    rows = rows + others
    feats = {f"{d}_{n}": x for (d, n), x in grid.items()}
    for d in DEPTHS:  # the opening and more of the answer, side by side
        feats[f"{d}_{'+'.join(map(str, ANSWER_TOKENS))}"] = ev.side_by_side(grid, d, ANSWER_TOKENS)
    verdicts, choose, _ = rule_selection(rows)
    refused = torch.tensor([r["refused"] for r in rows])
    # where each row comes from: its model for the labelled file's rows, else ("extra",) or ("check", FILE)
    source = ([r["model"] for r in rows[:len(rows) - len(others)]] + [("extra",)] * len(extra)
              + [("check", f) for f, c in checks.items() for _ in c])
    unsafe = torch.tensor([r["type"].startswith("contrast") for r in rows])
    explicit = torch.tensor([args.rules and ev.explicit_refusal(r["completion"]) for r in rows])
    claim = torch.tensor([args.rules and ev.restates_claim(r["prompt"], r["completion"]) for r in rows])
    models = sorted({s for s in source if isinstance(s, str)})
    is_extra = torch.tensor([s == ("extra",) for s in source])
    check_rows = {f: torch.tensor([s == ("check", f) for s in source]) for f in checks}

    def rows_of(*names):
        return torch.tensor([s in names for s in source])

    print("\nheld-out model | chosen on the other two | agreement | unsafe prompts: humans / judge refusals")
    for held in models:
        train = [m for m in models if m != held]
        patterns = torch.tensor(verdicts(choose(train)), dtype=torch.float64)[:, None]  # [N, 1]: rules chosen on train

        def x_of(key, with_patterns):
            return torch.cat([feats[key], patterns], 1) if with_patterns else feats[key]

        best = None
        for key, l2, with_patterns in itertools.product(feats, L2S, (False, True)):
            inner, x = [], x_of(key, with_patterns)
            for a, b in (train, train[::-1]):  # fit on one training model, score on the other
                fa, fb = rows_of(a) | is_extra, rows_of(b)
                probe = judge_check.fit_probe(x[fa], refused[fa].tolist(), l2)
                inner.append(agreement(probe, x[fb], refused[fb], explicit[fb], claim[fb]))
            score = sum(inner) / 2
            if best is None or score > best[0]:
                best = (score, key, l2, with_patterns)
        _, key, l2, with_patterns = best
        fit, test, x = rows_of(*train) | is_extra, rows_of(held), x_of(key, with_patterns)
        probe = judge_check.fit_probe(x[fit], refused[fit].tolist(), l2)
        pred = judged(probe, x[test], explicit[test], claim[test])
        u = unsafe[test]
        depth, n = key.split("_")
        print(f"{held:15s} | {depth} blocks, {n} tokens, l2 {l2:<5}, patterns {'in' if with_patterns else 'out'}"
              f" (inner {best[0]:.3f}) | "
              f"{(pred == refused[test]).double().mean():.3f} | "
              f"{refused[test][u].double().mean():.3f} / {pred[u].double().mean():.3f}", flush=True)
        for f, c in check_rows.items():
            pred = judged(probe, x[c], explicit[c], claim[c])
            print(f"    on {Path(f).name}: {(pred == refused[c]).double().mean():.3f} (n={int(c.sum())}) | "
                  f"humans / judge refusals {refused[c].double().mean():.3f} / {pred.double().mean():.3f}")
    patterns = torch.tensor([ev.is_refusal(r["completion"]) for r in rows])
    for held in models:
        test = rows_of(held)
        u = unsafe[test]
        print(f"patterns on {held:15s}: {(patterns[test] == refused[test]).double().mean():.3f} | "
              f"{refused[test][u].double().mean():.3f} / {patterns[test][u].double().mean():.3f}")
    for f, c in check_rows.items():
        print(f"patterns on {Path(f).name}: {(patterns[c] == refused[c]).double().mean():.3f}")


if __name__ == "__main__":
    main()
