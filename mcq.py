"""Multiple-choice accuracy by log-likelihood, scored as lm-evaluation-harness
scores its zero-shot tasks, so the numbers compare with published ones.

    python mcq.py --ckpt smollm2 --data ../shared/data/mcq_obqa_test.jsonl [--limit 100]

For each question the context is the task's prompt (no chat template), each
choice is the continuation " " + choice, and the model's summed log-prob of
the continuation's tokens is its score:
  acc       the choice with the highest summed log-prob is the gold one;
  acc_norm  the same after dividing each sum by the choice's length in
            characters (the harness's `completion_len`), which takes away
            the bias towards short choices.
Context and continuation are split as the harness splits them: the
continuation's tokens are those of encode(context + continuation) after the
first len(encode(context)) tokens, and trailing spaces of the context move to
the continuation. BOS is added where the tokenizer adds one by default
(SmolLM2: none).

Speed: all choices of a question share one row. The row holds the context
once, then each continuation as a branch that sees the context and itself
only (segments, as DPO's pair rows: data.collate_pairs), so the context runs
once per question instead of once per choice.
"""
import argparse
import random
from pathlib import Path

import torch

import common
import data
import losses
import model as model_lib

# The harness's zero-shot prompt per task. Our files hold the harness's fields
# already joined where it joins them: BoolQ's question is passage + "\nQuestion: " + question + "?".
PROMPTS = {
    "boolq": lambda q: f"{q}\nAnswer:",
    "piqa": lambda q: f"Question: {q}\nAnswer:",
    "openbookqa": lambda q: q,
    "arc": lambda q: f"Question: {q}\nAnswer:",
}
FILE_TASKS = (("boolq", "boolq"), ("piqa", "piqa"), ("obqa", "openbookqa"), ("openbookqa", "openbookqa"),
              ("arc", "arc"))


def task_of(path) -> str:
    """The harness task a file is, by its name (mcq_boolq_dev.jsonl -> boolq)."""
    name = Path(path).name.lower()
    for key, task in FILE_TASKS:
        if key in name:
            return task
    raise ValueError(f"{path}: cannot tell the task from the file name; name it after one of "
                     f"{sorted(PROMPTS)} (e.g. mcq_piqa_valid.jsonl) or pass --task")


def encode_choices(tok, context: str, choices) -> tuple[list[int], list[list[int]]]:
    """-> context ids, and each continuation's ids, split as the harness splits them."""
    spaces = len(context) - len(context.rstrip())
    tail, context = (context[len(context) - spaces:], context[:len(context) - spaces]) if spaces else ("", context)
    bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    context_ids = bos + tok.encode(context)
    conts = []
    for c in choices:
        whole = bos + tok.encode(context + tail + " " + c)
        conts.append(whole[len(context_ids):])
    return context_ids, conts


def question_rows(encoded, pad_id):
    """Questions -> one row each, [context[:-1] | context[-1] choice_1 | context[-1] choice_2 | ...]:
    input_ids, attention_mask, segments [B, T] (segment k + 1 is choice k; -1 padding) and
    choice_mask [B, K, T - 1], True where the shifted log-probs score choice k."""
    ids, segs = [], []
    for context, conts in encoded:
        if not context:
            raise ValueError("a question with an empty context has no token to predict its choices from")
        row, seg = list(context[:-1]), [0] * (len(context) - 1)
        for k, c in enumerate(conts):
            row += context[-1:] + c
            seg += [k + 1] * (1 + len(c))
        ids.append(row)
        segs.append(seg)
    input_ids, att = data.right_pad(ids, pad_id)
    segments, _ = data.right_pad(segs, -1)
    K = max(len(conts) for _, conts in encoded)
    # a token of choice k is scored where segment k + 1 continues (not at the context token that starts it)
    same = segments[:, 1:] == segments[:, :-1]
    choice_mask = torch.stack([same & (segments[:, 1:] == k + 1) for k in range(K)], 1)  # [B, K, T-1]
    return input_ids, att, segments, choice_mask


@torch.inference_mode()
def choice_logps(model, tok, items, task, batch_size=8, progress=False) -> list[list[float]]:
    """Per question, per choice: the summed log-prob of the continuation."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    prompt = PROMPTS[task]
    encoded = [encode_choices(tok, prompt(it["question"]), it["choices"]) for it in items]
    out = []
    for s in tqdm(range(0, len(encoded), batch_size), desc=f"mcq {task}", disable=not progress, leave=False):
        chunk = encoded[s:s + batch_size]
        ids, att, segments, choice_mask = (t.to(device) for t in question_rows(chunk, tok.pad_id))
        hidden = model(ids, att, return_hidden=True, segments=segments)
        loss_mask = torch.zeros_like(att, dtype=torch.bool)
        loss_mask[:, 1:] = choice_mask.any(1)
        per_token = losses.response_token_logps(hidden, model.lm_head_weight, ids, loss_mask)  # [B, T-1]
        sums = (per_token[:, None] * choice_mask).sum(-1)  # [B, K]
        out += [sums[i, :len(conts)].tolist() for i, (_, conts) in enumerate(chunk)]
    return out


def accuracy(items, lls) -> dict:
    """acc and acc_norm (per-item hits kept, for intervals)."""
    hits = [max(range(len(ll)), key=ll.__getitem__) == it["answer"] for it, ll in zip(items, lls)]
    normed = [[x / len(c) for x, c in zip(ll, it["choices"])] for it, ll in zip(items, lls)]
    hits_norm = [max(range(len(n)), key=n.__getitem__) == it["answer"] for it, n in zip(items, normed)]
    return {"acc": sum(hits) / len(items), "acc_norm": sum(hits_norm) / len(items),
            "hits": hits, "hits_norm": hits_norm}


def bootstrap_interval(values, n_resamples=2000, seed=0, level=0.95) -> tuple[float, float]:
    """Percentile bootstrap over items of the mean of `values` (0/1 hits, or any numbers)."""
    values = torch.as_tensor([float(v) for v in values], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(values), (n_resamples, len(values)), generator=g)
    means = values[picks].mean(1).sort().values
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    return float(means[int(lo * (n_resamples - 1))]), float(means[int(round(hi * (n_resamples - 1)))])


def evaluate(model, tok, path, task=None, limit=None, batch_size=8, seed=0, progress=False) -> dict:
    """One MCQ file -> {"task", "n", "acc", "acc_norm", their 95% intervals, "items_per_s",
    "hits", "hits_norm"} (the last two per question, 0 or 1, for paired comparisons).
    With `limit`, a seeded random sample of that many questions (not the first ones)."""
    import time

    import eval as evaluation  # load_mcq validates the file

    items = evaluation.load_mcq(path)
    if limit and limit < len(items):
        items = [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]
    task = task or task_of(path)
    t0 = time.time()
    res = accuracy(items, choice_logps(model, tok, items, task, batch_size, progress))
    seconds = time.time() - t0
    return {"task": task, "n": len(items), "acc": round(res["acc"], 4), "acc_norm": round(res["acc_norm"], 4),
            "acc_ci": [round(x, 4) for x in bootstrap_interval(res["hits"], seed=seed)],
            "acc_norm_ci": [round(x, 4) for x in bootstrap_interval(res["hits_norm"], seed=seed)],
            "items_per_s": round(len(items) / seconds, 2),
            "hits": [int(h) for h in res["hits"]], "hits_norm": [int(h) for h in res["hits_norm"]]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default=model_lib.DEFAULT_CKPT)
    ap.add_argument("--data", action="append", required=True, help="MCQ JSONL {question, choices, answer}")
    ap.add_argument("--task", choices=sorted(PROMPTS), help="default: from the file name")
    ap.add_argument("--limit", type=int, default=None, help="a seeded random sample of N questions per file")
    ap.add_argument("--batch-size", type=int, default=8, help="questions per forward pass")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    model, tok = model_lib.load_model(args.ckpt), data.load_tokenizer(args.ckpt)
    for path in args.data:
        r = evaluate(model, tok, path, args.task, args.limit, args.batch_size, args.seed, progress=True)
        print(f"{path}: {r['task']} n={r['n']} acc {r['acc']:.3f} {r['acc_ci']} "
              f"acc_norm {r['acc_norm']:.3f} {r['acc_norm_ci']} ({r['items_per_s']} questions/s)", flush=True)


if __name__ == "__main__":
    common.cli(main)
