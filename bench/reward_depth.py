"""Which depth and L2 weight should a linear-probe reward model use? Chosen by
cross-validation on the training pairs alone, then scored once on the held-out pairs.

    THP_MEM_ALLOC_ENABLE=1 python bench/reward_depth.py --data ../shared/data/pku_saferlhf_pairs.jsonl

It takes reward.py's split (same --train-pairs, --eval-pairs, --seed). One
forward pass of the whole model per pair gives, for every depth d, the
feature that the head of a d-layer reward model (`reward.py --layers d`)
reads: the final norm of block d's output at the answer's last token. For
each (d, L2) the head is fitted as reward.py fits it (reward.fit_bt_head:
Bradley-Terry on standardised feature differences), and 5-fold
cross-validation with folds by prompt scores it. The best (d, L2) is then fitted on all training pairs and
scored on the held-out ones, the number that

    reward.py --layers d --train-layers 0 --head-l2 L2

prints. About 30 minutes for the default 2,000 + 1,000 PKU pairs on 2 CPU
cores (the forward passes; the fits take a minute).
"""
import argparse
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import model as model_lib  # noqa: E402
import reward  # noqa: E402


@torch.no_grad()
def pair_features(rm, examples, pad_id, batch_size=16, desc=None) -> torch.Tensor:
    """Tokenised pairs -> [N, 2, L, H]: for chosen (0) and rejected (1), the
    final-norm output of every block 1..L at the answer's last token."""
    rm.eval()
    outputs = {}
    hooks = [block.register_forward_hook(lambda mod, inp, out, i=i: outputs.__setitem__(i, out))
             for i, block in enumerate(rm.model.layers)]
    n_layers, hidden = rm.config.num_hidden_layers, rm.config.hidden_size
    feats = torch.zeros(len(examples), 2, n_layers, hidden)
    order = sorted(range(len(examples)), key=lambda i: data.example_length(examples[i]))
    try:
        for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, file=sys.stderr):
            rows = order[s:s + batch_size]
            batch = data.collate_pairs([examples[i] for i in rows], pad_id)
            ids, mask, segments = (batch[k].to(rm.score.weight.device)
                                   for k in ("input_ids", "attention_mask", "segments"))
            rm(ids, mask, return_hidden=True, segments=segments)
            last = model_lib.last_token_index(mask, segments)  # [B, 2]
            layout = rm.token_layout(ids, mask.bool(), segments)
            for i in range(n_layers):
                x = layout.to_batch(outputs[i])  # a block's output is [computed tokens, H] (TokenLayout)
                at_end = x.gather(1, last[..., None].expand(-1, -1, hidden))  # [B, 2, H]
                feats[rows, :, i] = rm.model.norm(at_end).float().cpu()
    finally:
        for h in hooks:
            h.remove()
    return feats


def held_out_correct(train_feats, test_feats, l2) -> torch.Tensor:
    """Fit the head on train [N, 2, H] (reward.fit_bt_head); -> [M] bool, r(chosen) > r(rejected) on test [M, 2, H]."""
    head = reward.fit_bt_head(*train_feats.double().unbind(1), l2)
    return (test_feats[:, 0] - test_feats[:, 1]).double() @ head > 0


def cv_accuracy(feats, prompts, l2, folds=5, seed=0) -> float:
    """Mean held-out-fold accuracy over `folds` folds of whole prompts."""
    unique = sorted(set(prompts))
    random.Random(seed).shuffle(unique)
    fold_of = {q: i % folds for i, q in enumerate(unique)}
    fold = torch.tensor([fold_of[q] for q in prompts])
    return sum(held_out_correct(feats[fold != k], feats[fold == k], l2).double().mean().item()
               for k in range(folds)) / folds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default=model_lib.DEFAULT_CKPT)
    ap.add_argument("--data", required=True)
    ap.add_argument("--train-pairs", type=int, default=2000)
    ap.add_argument("--eval-pairs", type=int, default=1000)
    ap.add_argument("--max-len", type=int, default=256,
                    help="training pairs longer than this are dropped (as in reward.py)")
    ap.add_argument("--l2", default="0.01,0.03,0.1,0.3,1,3", help="comma-separated L2 weights to try")
    ap.add_argument("--min-depth", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    l2s = [float(x) for x in args.l2.split(",")]
    tok = data.load_tokenizer(args.ckpt)
    train_pairs, held = reward.split_pairs(data.load_preferences(args.data), args.train_pairs, args.eval_pairs,
                                           args.seed)
    train, _ = data.tokenize_pairs(tok, train_pairs, args.max_len)
    # Every held-out pair is kept, as reward.py scores them all (it cuts at 1024 tokens; PKU's need up to 419).
    test, _ = data.tokenize_pairs(tok, held, 10 ** 9)
    rm = reward.init_reward_model(args.ckpt, tok)
    f_train = pair_features(rm, train, tok.pad_id, desc="training pairs")
    f_test = pair_features(rm, test, tok.pad_id, desc="held-out pairs")
    prompts = [train_pairs[e["index"]]["prompt"] for e in train]

    depths = range(args.min_depth, rm.config.num_hidden_layers + 1)
    cv = {(d, l2): cv_accuracy(f_train[:, :, d - 1], prompts, l2, seed=args.seed) for d in depths for l2 in l2s}
    print(f"\n5-fold CV accuracy on {len(train)} training pairs ({len(set(prompts))} prompts), folds by prompt\n")
    print("| depth | " + " | ".join(f"L2 {x:g}" for x in l2s) + " |")
    print("|---" * (len(l2s) + 1) + "|")
    for d in depths:
        print(f"| {d} | " + " | ".join(f"{cv[d, x]:.3f}" for x in l2s) + " |")
    depth, l2 = max(cv, key=cv.get)
    correct = held_out_correct(f_train[:, :, depth - 1], f_test[:, :, depth - 1], l2)
    low, high = reward.prompt_bootstrap(correct.tolist(), [held[e["index"]]["prompt"] for e in test])
    print(f"\npicked by CV: depth {depth}, L2 {l2:g} (CV {cv[depth, l2]:.3f}); held-out accuracy "
          f"{correct.double().mean().item():.3f} on {len(test)} pairs (95% interval over prompts {low:.3f}-{high:.3f})")
    print(f"the same model: python reward.py --data {args.data} --layers {depth} --train-layers 0 --head-l2 {l2:g}")


if __name__ == "__main__":
    main()
