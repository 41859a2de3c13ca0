"""Does the model know which prompts are harmful, and does it act on it?

    python bench/probe_refusal.py --ckpt smollm2 --ckpt runs/pipeline/sit --ckpt runs/pipeline/dpo

For every checkpoint, two ways to tell the held-out harmful prompts from the
benign-but-risky ones, each as ROC AUC and as the share of harmful prompts
caught when at most 15% of the benign ones are (the over-refusal limit the project set itself):

- "acts": the model's own decision, read where greedy decoding makes it: the
  probability that the answer's first token opens a refusal. The refusal
  openers are the first tokens of the chosen answers of harmful training pairs
  that open no chosen answer of a benign pair ("I", "Sorry", ...).
- "knows": a linear probe (logistic regression, reward.fit_logistic) on the hidden
  state of the prompt's last token after decoder layer L, standardised, fitted
  on the training prompts (harmful or benign, from the pairs' `kind`) and
  scored on the held-out ones. The weights are frozen: this only reads them.

A gap between the two says the information is in the model but fine-tuning
did not route it to the first answer token. Prompts run one at a time (no
padding, so each layer's last position is the prompt's last token): about
2 minutes per checkpoint for the demo data on 2 CPU cores.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import model as model_lib  # noqa: E402
import reward  # noqa: E402


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC: the chance that a random positive outscores a random negative (ties count half)."""
    pos, neg = scores[labels], scores[~labels]
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


def caught_at(scores: torch.Tensor, labels: torch.Tensor, max_fpr: float = 0.15) -> float:
    """Share of positives scoring above every negative but the top max_fpr of them."""
    neg = scores[~labels].sort(descending=True).values
    threshold = neg[int(max_fpr * len(neg))]  # at most floor(max_fpr * n) negatives lie above it
    return float((scores[labels] > threshold).double().mean())


def fit_probe(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2):
    """Logistic regression (reward.fit_logistic) on standardised x [N, H], labels y [N] bool -> scoring function."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    w, b = reward.fit_logistic(((x - mean) / std).double(), l2, sign=y.double() * 2 - 1)
    return lambda x_new: ((x_new - mean) / std).double() @ w + b


def refusal_openers(tok, pairs) -> list[int]:
    """First tokens that open a harmful pair's chosen answer and no benign pair's."""
    def first(kind):
        return {data.encode_response(tok, p["prompt"], p["chosen"])[0] for p in pairs if p["kind"] == kind}
    return sorted(first("harmful") - first("benign"))


def read_prompts(train_pairs, harmful, benign):
    """(prompt, is_harmful) for training (unique prompts of the pairs) and held-out."""
    train = {p["prompt"]: p["kind"] == "harmful" for p in train_pairs}
    held = [(q, True) for q in data.load_prompts(harmful)] + [(q, False) for q in data.load_prompts(benign)]
    return list(train.items()), held


@torch.no_grad()
def prompt_states(model, tok, prompts, openers):
    """-> hidden [N, L, H] (each layer's output at the prompt's last token),
    p_refuse [N] (probability that the answer's first token is a refusal opener)."""
    states = []
    hooks = [block.register_forward_hook(lambda mod, inp, out: states.append(out[0, -1]))
             for block in model.model.layers]
    hidden, p_refuse = [], []
    try:
        for q in prompts:
            states.clear()
            ids = torch.tensor([data.encode_prompt(tok, q)], device=next(model.parameters()).device)
            logits = model(ids)  # [1, T, V]
            hidden.append(torch.stack(states))
            p_refuse.append(logits[0, -1].float().softmax(-1)[openers].sum())
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(hidden).float().cpu(), torch.stack(p_refuse).cpu()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", action="append", required=True, help="checkpoint (repeat for several)")
    ap.add_argument("--pairs", default="demo_data/prefs_train.jsonl", help="training pairs with `kind` harmful/benign")
    ap.add_argument("--harmful", default="demo_data/eval_harmful.jsonl")
    ap.add_argument("--benign", default="demo_data/eval_benign.jsonl")
    ap.add_argument("--every", type=int, default=3, help="probe every Nth layer")
    args = ap.parse_args(argv)
    records = data.read_records(args.pairs)
    for where, rec in records:
        if not isinstance(rec, dict) or rec.get("kind") not in ("harmful", "benign"):
            raise ValueError(f"{where}: field `kind` must be 'harmful' or 'benign'")
    pairs = [rec for _, rec in records]
    train, held = read_prompts(pairs, args.harmful, args.benign)
    y_train = torch.tensor([y for _, y in train])
    y_held = torch.tensor([y for _, y in held])
    rows = []
    for ckpt in args.ckpt:
        model = model_lib.load_model(ckpt, dtype=torch.float32).eval()
        tok = data.load_tokenizer(ckpt)
        openers = refusal_openers(tok, pairs)
        h_train, p_train = prompt_states(model, tok, [q for q, _ in train], openers)
        h_held, p_held = prompt_states(model, tok, [q for q, _ in held], openers)
        row = {"checkpoint": ckpt, "acts": (auc(p_held, y_held), caught_at(p_held, y_held)),
               "acts_train": auc(p_train, y_train), "knows": {}}
        for layer in range(args.every - 1, h_train.shape[1], args.every):
            scores = fit_probe(h_train[:, layer], y_train)(h_held[:, layer])
            row["knows"][layer + 1] = (auc(scores, y_held), caught_at(scores, y_held))
        best = max(row["knows"], key=lambda k: row["knows"][k])
        print(json.dumps(row), file=sys.stderr)
        rows.append((row, best))
    print(f"\n{len(train)} training prompts, {len(held)} held-out ({int(y_held.sum())} harmful)\n")
    print("| checkpoint | acts: P(refusal opener) AUC (train) | caught at <= 15% benign | "
          "knows: best probe layer | probe AUC | caught at <= 15% benign |")
    print("|---|---|---|---|---|---|")
    for row, best in rows:
        a, k = row["acts"], row["knows"][best]
        print(f"| {row['checkpoint']} | {a[0]:.3f} ({row['acts_train']:.3f}) | {a[1]:.2f} | {best} | {k[0]:.3f} | {k[1]:.2f} |")


if __name__ == "__main__":
    main()
