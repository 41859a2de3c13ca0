"""Reward models: score (prompt, answer) pairs, and train one on preference pairs.

    python reward.py --ckpt smollm2 --data ../shared/data/pku_saferlhf_pairs.jsonl --out runs/rm
    python reward.py --ckpt smollm2 --data pairs.jsonl --out runs/rm --layers 12 --train-layers 4
    python reward.py --ckpt smollm2 --data pairs.jsonl --out runs/rm --layers 17 --train-layers 0   # head only

A reward model here is a LLaMA backbone plus a scalar head, saved in the
Hugging Face `LlamaForSequenceClassification` layout (`score.weight` [1, H],
no lm_head), so transformers loads it too. Its reward is the head read at the
last real token of

    encode_prompt(prompt) + encode_response(answer)    (right-padded)

i.e. the prompt rendered with the checkpoint's template, the answer, and the
end-of-turn token. `score_texts` is the one function that does this; raft.py
and eval.py's `reward:DIR` judge both call it.

Public reward models in this layout load with `--reward DIR` as they are,
e.g. Skywork/Skywork-Reward-Llama-3.1-8B (and -v0.2): architectures
["LlamaForSequenceClassification"], one label, pad_token_id 128256 (a token
of its own), Llama 3 chat template. Models with a custom head (PKU-Alignment's
beaver-7b "LlamaForScore", ArmoRM's gating head) or a non-LLaMA backbone
(Gemma, Mistral-based RMs with sliding window) are not this layout.

Training is the Bradley-Terry recipe (the paper's "GemmaRM", trained on
PKU-SafeRLHF pairs): minimise -log sigmoid(r(x, y_chosen) - r(x, y_rejected))
(losses.reward_loss), then report pairwise accuracy on held-out pairs whose
prompts never appear in the training pairs.

What is simplified, and why:
  * One process, no gradient accumulation, no resume: a reward model on the
    paper's scale of data trains in one sitting; DDP and resume live in
    common.py for the long SFT/DPO runs.
  * The score head starts at zero (every reward 0, first loss exactly log 2)
    rather than random, so the starting point is the same on every seed.
  * For CPU runs the backbone can be cut to its lowest N layers (`--layers`)
    and only the top T of those trained (`--train-layers`): most of the cost
    is the forward pass through all layers for every pair, and mid-depth
    features of a small LM are known to be about as linearly useful as the
    last layer's. The saved model is then an N-layer reward model. With
    `--train-layers 0` the backbone stays frozen and only the head is fitted
    (`fit_head`): one forward pass per pair, no backward at all.
  * Training pairs longer than --max-len are dropped (data.tokenize_pairs
    keeps answers whole); held-out pairs are all scored, up to 1024 tokens.
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import data
import lora
import losses
import model as model_lib


# ----------------------------------------------------------------------------
# Building and scoring

def reward_pad_id(tok) -> int:
    """The pad_token_id a reward model's config.json gets. transformers'
    LlamaForSequenceClassification reads the score at the last token that is
    not pad_token_id, so it must differ from the end-of-turn id every scored
    sequence ends with (SmolLM2 and Llama 2 pad with that very id): the
    tokenizer's pad id if it is not a stop/BOS id, else the first special id
    that is not (SmolLM2: <|endoftext|> 0), else 0 (<unk> for Llama 2)."""
    candidates = [tok.pad_id, *sorted(tok.special.values()), 0]
    return next(i for i in candidates if i not in tok.stop_ids and i != tok.bos_id)


def init_reward_model(ckpt, tok, layers: int | None = None, device=None) -> model_lib.Llama:
    """A causal LM checkpoint -> a reward model: the same backbone (optionally
    only its lowest `layers` blocks), no lm_head, and a zero `score` head [1, H]."""
    lm = model_lib.load_model(ckpt, dtype=torch.float32, device=device)
    n_layers = lm.config.num_hidden_layers
    if layers is not None and not 1 <= layers <= n_layers:
        raise ValueError(f"--layers {layers}: the checkpoint has {n_layers} layers; choose 1..{n_layers}")
    raw = {k: v for k, v in lm.config.raw.items() if k not in ("id2label", "label2id")}
    raw.update(architectures=["LlamaForSequenceClassification"], num_labels=1, pad_token_id=reward_pad_id(tok),
               num_hidden_layers=layers or n_layers)
    cfg = model_lib.LlamaConfig.from_dict(raw, f"{ckpt} (as a reward model)")
    with torch.device("meta"):
        rm = model_lib.Llama(cfg)
    state = {k: v for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    # assign=True adopts the loaded tensors (the meta ones have no storage); the
    # lower `layers` blocks are taken, the rest of the backbone is dropped.
    result = rm.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys != ["score.weight"]:
        raise KeyError(f"{ckpt}: building the reward model left unexpected weights unset: {result.missing_keys}")
    rm.score = nn.Linear(cfg.hidden_size, 1, bias=False, device=lm.inv_freq.device)
    nn.init.zeros_(rm.score.weight)
    rm.inv_freq = lm.inv_freq
    rm.ckpt_dir = lm.ckpt_dir  # save_model copies the tokenizer files from there
    return rm


def load_reward_model(ckpt, device=None) -> model_lib.Llama:
    rm = model_lib.load_model(ckpt, device=device)
    if rm.config.num_labels != 1:
        raise ValueError(f"{ckpt}: not a scalar reward model (config.json must say architectures "
                         f"['LlamaForSequenceClassification'] with num_labels 1; got num_labels "
                         f"{rm.config.num_labels})")
    return rm


@torch.inference_mode()
def score_texts(rm, tok, prompts, answers, batch_size=16, max_len=1024, desc=None) -> list[float]:
    """Reward of each (prompt, answer): the score head at the last token of
    encode_prompt(prompt) + encode_response(prompt, answer). Sequences longer than
    max_len keep their first max_len tokens (the answer's end is lost, so is
    its end-of-turn token). Rows are batched by length to waste little padding;
    scores come back in the input order. With `desc`, a progress bar says so."""
    if len(prompts) != len(answers):
        raise ValueError(f"score_texts: {len(prompts)} prompts but {len(answers)} answers")
    seqs = [(data.encode_prompt(tok, p) + data.encode_response(tok, p, a))[:max_len]
            for p, a in zip(prompts, answers)]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    device = next(rm.parameters()).device
    pad_id = rm.config.raw.get("pad_token_id")  # padding is masked; this id only keeps transformers in step
    pad_id = tok.pad_id if pad_id is None else pad_id
    was_training = rm.training
    rm.eval()
    scores = [0.0] * len(seqs)
    for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, file=sys.stderr, leave=False):
        rows = order[s:s + batch_size]
        ids, mask = data.right_pad([seqs[i] for i in rows], pad_id, device)
        for i, r in zip(rows, rm.reward(ids, mask).float().tolist()):
            scores[i] = r
    rm.train(was_training)
    return scores


def pairwise_accuracy(rm, tok, pairs, batch_size=16) -> dict:
    """Share of pairs with r(chosen) > r(rejected) (a tie counts as wrong), and the mean margin."""
    prompts = [p["prompt"] for p in pairs]
    chosen = score_texts(rm, tok, prompts, [p["chosen"] for p in pairs], batch_size,
                         desc="scoring chosen")
    rejected = score_texts(rm, tok, prompts, [p["rejected"] for p in pairs], batch_size,
                           desc="scoring rejected")
    margins = [c - r for c, r in zip(chosen, rejected)]
    correct = [m > 0 for m in margins]
    return {"accuracy": sum(correct) / len(margins), "margin": sum(margins) / len(margins),
            "pairs": len(pairs), "prompts": len(set(prompts)), "interval": prompt_bootstrap(correct, prompts)}


def prompt_bootstrap(correct, prompts, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of an accuracy over pairs when whole prompts are resampled
    (bootstrap): pairs that share a prompt are not independent (PKU-SafeRLHF
    has ~5 per prompt), so the interval is that of the number of prompts."""
    groups = {}
    for ok, q in zip(correct, prompts):
        groups.setdefault(q, []).append(ok)
    hits = torch.tensor([sum(g) for g in groups.values()], dtype=torch.float64)  # per prompt
    sizes = torch.tensor([len(g) for g in groups.values()], dtype=torch.float64)
    pick = torch.randint(len(hits), (resamples, len(hits)), generator=torch.Generator().manual_seed(seed))
    accs = (hits[pick].sum(1) / sizes[pick].sum(1)).sort().values  # [resamples]
    return float(accs[int(0.025 * resamples)]), float(accs[int(0.975 * resamples) - 1])


def split_pairs(pairs, n_train: int, n_eval: int, seed: int):
    """Held-out and training pairs with disjoint prompts (PKU-SafeRLHF has ~5
    pairs per prompt, so a split by pair would leak prompts): prompts are
    shuffled, whole prompt groups go to the held-out set until it has n_eval
    pairs, and n_train training pairs are drawn from the remaining prompts."""
    rng = random.Random(seed)
    groups = {}
    for p in pairs:
        groups.setdefault(p["prompt"], []).append(p)
    prompts = sorted(groups)
    rng.shuffle(prompts)
    held, rest = [], []
    for q in prompts:
        (held if len(held) < n_eval else rest).extend(groups[q])
    rng.shuffle(rest)
    held, train = held[:n_eval], rest[:n_train]
    if len(train) < n_train or len(held) < n_eval:
        raise ValueError(f"asked for {n_train} training + {n_eval} held-out pairs with disjoint prompts, "
                         f"but the data gives {len(train)} + {len(held)}; lower --train-pairs/--eval-pairs")
    return train, held


# ----------------------------------------------------------------------------
# Training

def build_parser():
    ap = argparse.ArgumentParser(description="Train a Bradley-Terry reward model on preference pairs.")
    common.add_model_args(ap)
    common.add_optimizer_args(ap, lr=5e-5)
    ap.set_defaults(max_len=256, warmup_ratio=0.05, dtype="fp32")
    ap.add_argument("--data", required=True, help="preference pairs (JSONL {prompt, chosen, rejected}, PKU, HH)")
    ap.add_argument("--out", required=True, help="folder for the reward model (HF LlamaForSequenceClassification)")
    ap.add_argument("--train-pairs", type=int, default=2000)
    ap.add_argument("--eval-pairs", type=int, default=1000, help="held-out pairs, prompts disjoint from training")
    ap.add_argument("--layers", type=int, default=None, help="keep only the lowest N decoder layers (CPU runs)")
    ap.add_argument("--train-layers", type=int, default=None,
                    help="train only the top T kept layers + final norm + head (default: all); "
                         "0: fit the head alone on the frozen backbone (a linear probe, see fit_head)")
    ap.add_argument("--head-l2", type=float, default=0.03,
                    help="--train-layers 0 or --probe-first: L2 penalty on the head, on standardised features "
                         "(how the default was chosen: docs/performance.md, reward model row)")
    ap.add_argument("--probe-first", action="store_true",
                    help="fit the head on the frozen backbone first (fit_head), then train the layers from there")
    ap.add_argument("--lora-rank", type=int, default=0, help="> 0: LoRA on the backbone (head trained fully)")
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument("--log-every", type=int, default=10)
    return ap


def freeze_lower(rm, train_layers: int):
    """Only the top `train_layers` blocks, the final norm and the head learn;
    autograd then never goes below them, which is where the time is saved.
    With 0 only the head learns."""
    n = rm.config.num_hidden_layers
    if not 0 <= train_layers <= n:
        raise ValueError(f"--train-layers {train_layers}: the reward model has {n} layers")
    for p in rm.parameters():
        p.requires_grad_(False)
    top = [*rm.model.layers[n - train_layers:], rm.model.norm] if train_layers else []
    for module in [*top, rm.score]:
        for p in module.parameters():
            p.requires_grad_(True)


def fit_logistic(x: torch.Tensor, l2: float, sign: torch.Tensor | None = None):
    """Full-batch L-BFGS logistic regression on x [N, D] (float64):

        min_{w, b}  mean_i softplus(-sign_i * (x_i . w + b)) + l2 * |w|^2

    sign [N] is +1/-1 per row (a class label); without it every row is a
    Bradley-Terry "first beats second" difference, the loss needs no bias and
    b stays 0. -> (w [D], b) detached."""
    w = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, device=x.device, requires_grad=sign is not None)
    opt = torch.optim.LBFGS([w, b] if sign is not None else [w], max_iter=500, tolerance_grad=1e-9,
                            line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        logits = x @ w if sign is None else sign * (x @ w + b)
        loss = F.softplus(-logits).mean() + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(objective)
    return w.detach(), b.detach()


def fit_bt_head(chosen: torch.Tensor, rejected: torch.Tensor, l2: float) -> torch.Tensor:
    """Bradley-Terry head on frozen features: chosen, rejected [N, H] (float64,
    the features f the head reads for each pair's two answers) -> head [H],
    w / s, where w minimises

        mean_i -log sigmoid(w . (f_chosen_i - f_rejected_i) / s) + l2 * |w|^2

    by full-batch L-BFGS (fit_logistic), and s is each feature's spread over
    all 2N answers (so one l2 suits every layer: SmolLM2's hidden states have a
    few dimensions hundreds of times larger than the rest). The reward of an
    answer is then head . f."""
    spread = torch.cat([chosen, rejected]).std(0).clamp_min(1e-6)
    w, _ = fit_logistic((chosen - rejected) / spread, l2)
    return w / spread


def fit_head(rm, train, pad_id, l2: float, batch_size: int, autocast) -> dict:
    """--train-layers 0 (or --probe-first): the backbone is frozen, so each
    answer's feature (Llama.reward_features: what the head reads) is computed
    once, and the head is fitted on them (fit_bt_head). This is a linear
    probe: on 2,000 PKU pairs it scored higher on held-out pairs than training
    the top layers from a zero head did, in about the same time (the README's
    reward row)."""
    feats, device = [], rm.score.weight.device
    order = sorted(range(len(train)), key=lambda i: data.example_length(train[i]))
    with torch.no_grad():
        for s in tqdm(range(0, len(order), batch_size), desc="features", file=sys.stderr):
            batch = data.collate_pairs([train[i] for i in order[s:s + batch_size]], pad_id)
            ids, att, segments = (batch[k].to(device) for k in ("input_ids", "attention_mask", "segments"))
            with autocast:
                f = rm.reward_features(ids, att, segments)  # [B, 2, H]
            feats.append(f.double())
    chosen, rejected = torch.cat(feats).unbind(1)  # [N, H] each, in `order`
    head = fit_bt_head(chosen, rejected, l2)
    with torch.no_grad():
        rm.score.weight.copy_(head.to(rm.score.weight.dtype)[None])
    margins = (chosen - rejected) @ head
    return {"step": 0, "loss": float(F.softplus(-margins).mean()), "rewards/margins": float(margins.mean()),
            "rewards/accuracies": float((margins > 0).double().mean()), "pairs": len(train)}


def train_backbone(rm, train, steps, pad_id, autocast, args, t_start) -> list[dict]:
    """The Bradley-Terry loop: one optimiser step per planned batch of pairs."""
    opt, sched = common.make_optimizer(rm, args, len(steps))
    log, device = [], rm.score.weight.device
    for step, (indices,) in enumerate(steps):
        batch = data.collate_pairs([train[i] for i in indices], pad_id)
        ids, att, segments = (batch[k].to(device) for k in ("input_ids", "attention_mask", "segments"))
        with autocast:
            rewards = rm.reward(ids, att, segments)  # [B, 2]
        loss, metrics = losses.reward_loss(rewards[:, 0].float(), rewards[:, 1].float())
        loss.backward()
        grad_norm, lr = common.optimizer_step(rm, opt, sched, float(loss.detach()), step + 1, args)
        log.append({"step": step + 1, "lr": lr, "grad_norm": grad_norm,
                    **{k: float(v) for k, v in metrics.items()}, "elapsed_s": round(time.time() - t_start, 1)})
        if args.log_every and ((step + 1) % args.log_every == 0 or step + 1 == len(steps)):
            recent = log[-args.log_every:]
            mean = {k: sum(r[k] for r in recent) / len(recent) for k in ("loss", "rewards/accuracies",
                                                                         "rewards/margins")}
            print(f"step {step + 1}/{len(steps)} loss {mean['loss']:.4f} acc {mean['rewards/accuracies']:.3f} "
                  f"margin {mean['rewards/margins']:.3f} lr {lr:.2e} ({time.time() - t_start:.0f}s)", flush=True)
    return log


def main(argv=None):
    """Train, save, evaluate; returns the held-out metrics (tests call this in-process)."""
    args = build_parser().parse_args(argv)
    args.grad_accum = 1  # read by common.plan_steps
    torch.manual_seed(args.seed)
    t_start = time.time()
    out = Path(args.out)
    model_lib.read_config(model_lib.resolve_ckpt(args.ckpt))  # a model it cannot run is said before any work
    tok = data.load_tokenizer(args.ckpt, args.template, args.system)
    print(data.describe_template(tok))
    load_stats = {}
    pairs = data.load_preferences(args.data, load_stats)
    train_pairs, held_out = split_pairs(pairs, args.train_pairs, args.eval_pairs, args.seed)
    train, tok_stats = data.tokenize_pairs(tok, train_pairs, args.max_len)
    lengths = [data.example_length(e) for e in train]
    steps = common.plan_steps(lengths, args, world=1) if args.train_layers != 0 else []  # head only: no steps

    rm = init_reward_model(args.ckpt, tok, args.layers)
    device = next(rm.parameters()).device
    if args.dtype == "auto":
        args.dtype = "bf16" if common.native_bf16(device) else "fp32"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    if args.lora_rank > 0:
        lora.add_lora(rm, args.lora_rank)  # freezes everything else ...
        rm.score.weight.requires_grad_(True)  # ... but a new head must learn
    elif args.train_layers is not None:
        freeze_lower(rm, args.train_layers)
    rm.train()
    n_train = sum(p.numel() for p in rm.parameters() if p.requires_grad)
    config = {**vars(args), "prompt_template": data.template_info(tok),
              "data_stats": load_stats, "tokenize_stats": tok_stats, "steps": len(steps),
              "trainable_params": n_train, "total_params": sum(p.numel() for p in rm.parameters()),
              "held_out_pairs": len(held_out)}
    print(json.dumps(config, indent=2), flush=True)

    log = []
    if args.train_layers == 0 or args.probe_first:
        # A fitted head before any layer moves ("LP-FT", Kumar et al. 2022): the
        # layers then start from a useful signal instead of a zero head's.
        log.append(fit_head(rm, train, tok.pad_id, args.head_l2, args.eval_batch_size, autocast))
        print(f"head fitted: loss {log[0]['loss']:.4f} training accuracy {log[0]['rewards/accuracies']:.3f} "
              f"({time.time() - t_start:.0f}s)", flush=True)
    if args.train_layers != 0:
        log += train_backbone(rm, train, steps, tok.pad_id, autocast, args, t_start)

    if args.lora_rank > 0:
        lora.merge_lora(rm)
    model_lib.save_model(rm, out)
    common.save_template_file(out, args)
    t_train = time.time() - t_start
    with autocast:
        result = pairwise_accuracy(rm, tok, held_out, args.eval_batch_size)
    result.update(train_seconds=round(t_train, 1), total_seconds=round(time.time() - t_start, 1))
    low, high = result["interval"]
    print(f"held-out pairwise accuracy {result['accuracy']:.4f} on {result['pairs']} pairs "
          f"(95% interval over its {result['prompts']} prompts {low:.3f}-{high:.3f}; mean margin "
          f"{result['margin']:.3f}); train {t_train:.0f}s, total {result['total_seconds']:.0f}s")
    (out / "train_config.json").write_text(json.dumps(config, indent=2))
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    common.mark_finished(out, heldout_accuracy=result["accuracy"])
    return result


if __name__ == "__main__":
    common.cli(main)
