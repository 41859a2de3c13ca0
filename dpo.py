"""Direct Preference Optimisation (Rafailov et al. 2023) on preference pairs,
as in the paper: sigmoid loss, beta 0.1, PKU-SafeRLHF pairs (safe chosen,
unsafe rejected).

    python dpo.py --data demo_data/prefs_train.jsonl --out runs/dpo
    python dpo.py --ckpt runs/sit --data ../shared/data/pku_saferlhf_pairs.jsonl --out runs/dpo --ref model
    torchrun --nproc_per_node 2 dpo.py --data ... --out ...

The reference model, three ways (--ref):
  precompute (default)  one no-grad pass over the data before training stores
                        log ref(y|x) for every answer the run will train on, in
                        OUT/state/ref_logps.pt; training then runs only the
                        policy, and --resume reuses the file.
  model                 a frozen copy of the starting model runs beside the
                        policy; with LoRA no copy is made: the reference is the
                        policy with its adapters switched off (lora.lora_disabled).
  --reference-free      no reference at all (the ref log-probs are 0).

Speed on a CPU: each pair is one row [prompt | chosen | rejected] in which
both answers branch off a prompt computed once (data.collate_pairs), the
model skips padding and runs the beginning all rows share (the chat
template's system prompt) once per batch, batches are length-grouped, and
the log-probs come from the hidden states chunk by chunk (--logprob-impl
chunked, the default off GPU) so the [B, T, V] logits never exist. Least memory:
`THP_MEM_ALLOC_ENABLE=1 python dpo.py --grad-checkpointing ...` (measured
against TRL's DPOTrainer in docs/performance.md).

Openings (--opening-words N): every answer is cut to its first N words and
left open (no end-of-turn token), so the whole loss is on how the answer
begins. A safety pair's decision, decline or help, is made there; with whole
answers most of the loss goes to the rest (how this was chosen:
docs/dpo_recipe.md). Pairs given with --whole-data keep their whole answers
all the same (an anchor for how whole answers go on). A pair with a "prefix"
field starts inside an answer: the prefix runs with the prompt, untrained, and
N counts the words after it (data.tokenize_pairs), so a pair can teach what
comes next, e.g. going on with the task rather than a glued-in refusal.

Learning rate: the paper's 5e-7 is for 7B models and thousands of steps. A
demo run here is tens of steps, so the default is 5e-6 (full fine-tuning).
With LoRA use ~1e-4 (the adapters start at zero and move slowly).
"""
import argparse
import collections
import contextlib
import copy
import hashlib
import json
import time

import torch

import common
import data
import lora
import losses
import model as model_lib


def build_parser():
    ap = argparse.ArgumentParser(description="DPO on preference pairs")
    common.add_common_args(ap, lr=5e-6)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--loss", choices=losses.DPO_LOSS_TYPES, default="sigmoid")
    ap.add_argument("--label-smoothing", type=float, default=0.0, help="cDPO (sigmoid) / robust DPO epsilon")
    ap.add_argument("--ref", choices=("precompute", "model"), default="precompute")
    ap.add_argument("--reference-free", action="store_true")
    ap.add_argument("--nll-weight", type=float, default=0.0,
                    help="alpha of an added NLL term on the chosen answers (RPO; TRL's rpo_alpha); 0 = plain DPO")
    ap.add_argument("--opening-words", type=int, default=0,
                    help="> 0: train on how answers begin, their first N words (data.tokenize_pairs); "
                         "0 = whole answers")
    ap.add_argument("--whole-data", action="append", default=[], metavar="FILE",
                    help="more preference pairs, trained on whole answers even with --opening-words (e.g. the "
                         "model's own answers to ordinary instructions against refusals: an anchor for whole answers)")
    ap.add_argument("--anchor-data", action="append", default=[], metavar="FILE",
                    help="instruction data (as sft.py reads it) on whose answers the policy is kept close to the "
                         "starting model: adds --anchor-weight x KL(start || policy) per answer token")
    ap.add_argument("--anchor-ckpt", metavar="DIR",
                    help="keep the policy close to this model on the anchor answers instead of the starting one "
                         "(e.g. the model before SIT); it must share the policy's tokenizer")
    ap.add_argument("--anchor-weight", type=float, default=1.0, help="weight of the anchor's KL term")
    ap.add_argument("--anchor-batch-size", type=int, default=2, help="anchor answers per optimiser step")
    ap.add_argument("--anchor-every", type=int, default=1, metavar="N",
                    help="the anchor on every N-th step only, its weight times N (the same gradient on average, "
                         "1/N of its cost: it is a whole answer's forward and backward)")
    ap.add_argument("--anchor-answer-tokens", type=int, default=0, metavar="N",
                    help="> 0: the anchor reads each answer's first N tokens only (its cost shrinks with N); "
                         "0 = whole answers")
    ap.add_argument("--anchor-top-k", type=int, default=64,
                    help="the starting model's distributions are kept as their k likeliest tokens (top_k_kl)")
    ap.add_argument("--balance-by", metavar="FIELD",
                    help="a field of every pair (e.g. kind: harmful / benign): weight the pairs so that each of "
                         "its values carries the same share of the loss (balance_weights); default: all alike")
    return ap


def balance_weights(groups: list) -> torch.Tensor:
    """Per-pair loss weights N / (G * n_g) for N pairs in G groups, n_g in
    group g: every group then carries the same total weight, and the weights
    still average 1 (a class-balanced loss). With --balance-by kind on the
    demo data the model learns as much about when to answer (benign pairs) as
    about when to decline (harmful ones), however many pairs each kind has."""
    counts = collections.Counter(groups)
    return torch.tensor([len(groups) / (len(counts) * counts[g]) for g in groups])


def pair_logps(net, weight, batch, device, args):
    """Log-probs of both answers under `net`, from one forward pass over the
    pair rows [B, T] (data.collate_pairs: each prompt runs once, its two
    answers branch off it). Returns chosen [B], rejected [B] (summed over
    answer tokens; averaged for IPO)."""
    ids, att, mask, segments = (batch[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask", "segments"))
    hidden = net(ids, att, return_hidden=True, segments=segments)  # [B, T, H]
    per_token = losses.response_token_logps(hidden, weight, ids, mask, impl=args.logprob_impl)  # [B, T-1]
    return tuple(losses.reduce_sequence(per_token, batch[k].to(device), average=args.loss == "ipo")
                 for k in ("chosen_mask", "rejected_mask"))


def pair_logps_plain(model, examples, pad_id, average=False):
    """pair_logps' plain twin, the layout DPO is usually written in: chosen
    and rejected stacked as [2B, T] rows (prompt + answer, right-padded), full
    logits [2B, T, V], losses.sequence_logps. Each prompt runs twice and the
    logits exist whole; the numbers and gradients are pair_logps' own
    (tests/test_sft_dpo.py). Returns chosen [B], rejected [B]."""
    answers = [(e["prompt_ids"], e[k]) for k in ("chosen_ids", "rejected_ids") for e in examples]
    ids, att = data.right_pad([p + a for p, a in answers], pad_id)  # [2B, T]: all chosen rows, then all rejected
    trained = data.right_pad([[0] * len(p) + [1] * len(a) for p, a in answers], 0)[0].bool()
    logps = losses.sequence_logps(model(ids, att), ids, trained, average)  # [2B]
    return logps[:len(examples)], logps[len(examples):]


@torch.no_grad()
def precompute_reference(model, train, rows, tok, args, run, out):
    """Fill out[i] = (log ref(chosen), log ref(rejected)) for the pairs in
    `rows`. Each rank scores every world-th batch; a sum over ranks joins them."""
    part = torch.zeros(len(train), 2, device=run.device)
    order = sorted(rows, key=lambda i: data.example_length(train[i]))  # similar lengths: little padding
    size = 2 * args.batch_size  # no activations kept for backward: bigger batches fit
    batches = [order[s:s + size] for s in range(0, len(order), size)][run.rank::run.world]
    was_training = model.training
    model.eval()
    bar = common.progress(run, len(batches), 0, args, "reference log-probs")
    with lora.lora_disabled(model), common.autocast(args, run.device):
        for batch_rows in batches:
            chosen, rejected = pair_logps(model, model.lm_head_weight, data.collate_pairs(
                [train[i] for i in batch_rows], tok.pad_id), run.device, args)
            part[batch_rows] = torch.stack([chosen, rejected], 1).float()
            bar.update(1)
    bar.close()
    model.train(was_training)
    part = run.sum(part)
    out[rows] = part[rows]


def checkpoint_fingerprint(ckpt) -> list:
    """[name, size, mtime_ns] of a checkpoint's weight and config files: a reference cache made
    from other weights in the same folder no longer matches."""
    folder = model_lib.resolve_ckpt(ckpt)
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(folder.iterdir())
            if f.suffix in (".safetensors", ".json")]


def reference_cache(model, train, steps, tok, args, run):
    """[N, 2] reference log-probs of the pairs the step plan uses (NaN for the
    others), from OUT/state/ref_logps.pt when it was made for this data and
    settings; pairs it lacks are computed and the file is rewritten."""
    file = run.state_dir / "ref_logps.pt"
    ids = json.dumps([[e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]] for e in train])
    key = json.dumps({"ckpt": str(args.ckpt), "ckpt_files": checkpoint_fingerprint(args.ckpt),
                      "max_len": args.max_len, "average": args.loss == "ipo", "template": args.template,
                      "pairs": hashlib.sha256(ids.encode()).hexdigest()})
    logps = torch.full((len(train), 2), float("nan"), device=run.device)
    if file.is_file():
        try:  # weights_only: tensors and plain data only, so a crafted file cannot run code
            saved = torch.load(file, map_location=run.device, weights_only=True)
        except Exception as e:
            raise ValueError(f"{file}: not a reference cache this script wrote ({type(e).__name__}); "
                             "delete it to recompute") from None
        if saved.get("key") == key:
            logps = saved["logps"].to(run.device)
        else:
            run.print(f"reference log-probs: {file} was made for other data or settings; recomputing")
    used = sorted({i for micro in steps for rows in micro for i in rows})
    missing = [i for i in used if torch.isnan(logps[i]).any()]
    run.print(f"reference log-probs: {len(used) - len(missing)} of {len(used)} pairs cached in {file}")
    if missing:
        precompute_reference(model, train, missing, tok, args, run, logps)
        if run.main:
            with common.replacing(file) as tmp:
                torch.save({"key": key, "logps": logps.cpu()}, tmp)
        run.barrier()
    return logps


@torch.no_grad()
def anchor_targets(model, examples, args, run):
    """The anchor model's next-token distributions on every anchor answer
    (losses.top_k_distribution), computed once before training: a list with
    (ids [n, k], logps [n, k], rest [n]) for each example's n answer tokens.
    The anchor model is the starting one (its weights before any step), or
    --anchor-ckpt's."""
    if args.anchor_ckpt:
        source = model_lib.load_model(args.anchor_ckpt, dtype=torch.float32, device=run.device)
        if source.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"--anchor-ckpt {args.anchor_ckpt}: vocabulary of {source.config.vocab_size} tokens, "
                             f"the policy's has {model.config.vocab_size}; the anchor needs the same tokenizer")
        adapters_off = contextlib.nullcontext()
    else:
        source, adapters_off = model, lora.lora_disabled(model)
    was_training = source.training
    source.eval()
    targets = []
    with adapters_off, common.autocast(args, run.device):
        for s in range(0, len(examples), 2 * args.batch_size):
            batch = data.collate_sft(examples[s:s + 2 * args.batch_size], 0)
            hidden, mask = anchor_hidden(source, batch, run.device)
            ids, logps, rest = losses.top_k_distribution(hidden, source.lm_head_weight, args.anchor_top_k)
            counts = mask.sum(-1).tolist()  # answer tokens per row, in the row-major order of `hidden`
            targets += list(zip(ids.split(counts), logps.split(counts), rest.split(counts)))
    source.train(was_training)
    return targets


def cut_answers(examples, n):
    """tokenize_sft's examples with each answer cut to its first n tokens (n = 0: whole)."""
    return [{**ex, "input_ids": ex["input_ids"][:ex["n_prompt"] + n]} for ex in examples] if n else examples


def anchor_hidden(net, batch, device):
    """Hidden states [M, H] that predict the answer tokens of an SFT batch, and the
    [B, T-1] mask that picks them (losses.response_hidden)."""
    ids, att, mask = (batch[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask"))
    return losses.response_hidden(net(ids, att, return_hidden=True), mask)


def anchor_indices(step, n, per_step, seed):
    """The anchor examples of optimiser step `step`: a seeded shuffle of the n
    examples, walked per_step at a time (reshuffled on every pass), so the plan
    is a pure function of the step and a resumed run draws the same examples."""
    import random

    out = []
    for j in range(step * per_step, (step + 1) * per_step):
        order = random.Random(f"{seed}-{j // n}").sample(range(n), n)
        out.append(order[j % n])
    return out


def check_dpo_args(args):
    """DPO's own ranges: a beta <= 0 trains the opposite preference while the logs look fine."""
    if args.beta <= 0:
        raise ValueError(f"--beta {args.beta}: must be > 0")
    if args.opening_words < 0:
        raise ValueError(f"--opening-words {args.opening_words}: must be >= 0 (0 = whole answers)")
    if args.nll_weight < 0:
        raise ValueError(f"--nll-weight {args.nll_weight}: must be >= 0")
    if not 0 <= args.label_smoothing < 0.5:
        raise ValueError(f"--label-smoothing {args.label_smoothing}: must be in [0, 0.5)")
    if args.anchor_weight < 0:
        raise ValueError(f"--anchor-weight {args.anchor_weight}: must be >= 0")
    if args.anchor_batch_size < 1:
        raise ValueError(f"--anchor-batch-size {args.anchor_batch_size}: must be >= 1")
    if args.anchor_every < 1:
        raise ValueError(f"--anchor-every {args.anchor_every}: must be >= 1")
    if args.anchor_answer_tokens < 0:
        raise ValueError(f"--anchor-answer-tokens {args.anchor_answer_tokens}: must be >= 0")
    if args.anchor_top_k < 1:
        raise ValueError(f"--anchor-top-k {args.anchor_top_k}: must be >= 1")
    if args.anchor_ckpt and not args.anchor_data:
        raise ValueError("--anchor-ckpt: needs --anchor-data (the answers the anchor reads)")


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_dpo_args(args)
    run = common.setup(args)
    common.seed_everything(args.seed + run.rank)
    tok = data.load_tokenizer(args.ckpt, args.template, args.system)
    load_stats = {}
    keep = (args.balance_by,) if args.balance_by else ()
    opened = [p for path in args.data for p in data.load_preferences(path, load_stats, keep)]
    whole = [p for path in args.whole_data for p in data.load_preferences(path, load_stats, keep)]
    pairs = opened + whole
    words = [args.opening_words] * len(opened) + [0] * len(whole)
    train, tok_stats = data.tokenize_pairs(tok, pairs, args.max_len, words)
    lengths = [data.example_length(e) for e in train]
    steps = common.plan_steps(lengths, args, run.world)
    groups = [pairs[e["index"]][args.balance_by] if args.balance_by else "all" for e in train]
    weights = balance_weights(groups)  # [N]
    anchor, anchor_stats = [], {}
    if args.anchor_data:
        anchor_stats = {"loaded": {}}
        examples = [ex for path in args.anchor_data for ex in data.load_instructions(path, anchor_stats["loaded"])]
        anchor, anchor_stats["tokenize"] = data.tokenize_sft(tok, examples, args.max_len)
        anchor = cut_answers(anchor, args.anchor_answer_tokens)
        if min(len(anchor), args.anchor_batch_size) < run.world:
            raise ValueError(f"--anchor-data: {len(anchor)} examples fit --max-len and --anchor-batch-size is "
                             f"{args.anchor_batch_size}; each of the {run.world} ranks needs one")
    run.print(data.describe_template(tok))
    common.save_config(run, args, {"prompt_template": data.template_info(tok), "data_stats": load_stats,
                                   "tokenize_stats": tok_stats, "anchor_stats": anchor_stats, "steps": len(steps),
                                   "padding": common.padding_report(lengths, args.batch_size, args.seed),
                                   "pair_weights": dict(zip(groups, weights.tolist()))})
    weights = weights.to(run.device)
    model = common.load_policy(args, run.device)

    ref_logps = ref_model = None
    if args.reference_free:
        pass
    elif args.ref == "precompute":
        ref_logps = reference_cache(model, train, steps, tok, args, run)  # [N, 2]
    elif args.lora_rank > 0:
        ref_model = model  # run under lora_disabled: the base weights, adapters off
    else:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    targets = anchor_targets(model, anchor, args, run) if anchor else []  # before the first step

    net = common.wrap_ddp(model, run)
    opt, sched = common.make_optimizer(model, args, len(steps))
    start = common.load_state(run, model, opt, sched) if args.resume else 0
    log = common.StepLog(run, start)
    bar = common.progress(run, len(steps), start, args, "dpo")
    pair_metrics = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "logps/chosen", "logps/rejected") + (("nll/chosen",) if args.nll_weight else ())
    metric_names = pair_metrics + (("anchor/kl",) if anchor else ())

    for step in range(start, len(steps)):
        t0 = time.time()
        micro = steps[step]
        step_pairs = sum(len(b) for b in micro)  # pairs in the whole step, all ranks: the loss denominator
        totals = torch.zeros(1 + len(metric_names), device=run.device)  # loss, then metrics, summed over pairs
        seen = 0
        anchored = bool(anchor) and step % args.anchor_every == 0
        if anchored:  # the KL anchor: its own small batch, the same for every micro-batch split of the step
            draw = step // args.anchor_every  # the anchor's own step count: its examples in the same order
            local = anchor_indices(draw, len(anchor), args.anchor_batch_size, args.seed)[run.rank::run.world]
            batch = data.collate_sft([anchor[i] for i in local], tok.pad_id)
            sync_later = net.no_sync() if run.world > 1 else contextlib.nullcontext()  # synced by the last pair batch
            with sync_later, common.autocast(args, run.device):
                hidden, _ = anchor_hidden(net, batch, run.device)
                ref = [torch.cat(parts) for parts in zip(*(targets[i] for i in local))]
                kl = losses.top_k_kl(hidden, model.lm_head_weight, *ref).mean()  # per answer token
                (args.anchor_weight * args.anchor_every * kl).backward()
            totals[-1] += kl.detach() * step_pairs / run.world  # logged as a mean over ranks
            seen += int(batch["attention_mask"].sum())
        for k, indices in enumerate(micro):
            local = indices[run.rank::run.world]  # this rank's pairs of the micro-batch
            batch = data.collate_pairs([train[i] for i in local], tok.pad_id)
            # DDP all-reduces gradients after the last micro-batch only
            sync_later = net.no_sync() if run.world > 1 and k < len(micro) - 1 else contextlib.nullcontext()
            with sync_later, common.autocast(args, run.device):
                chosen, rejected = pair_logps(net, model.lm_head_weight, batch, run.device, args)  # [b], [b]
                if ref_logps is not None:
                    ref_chosen, ref_rejected = ref_logps[local, 0], ref_logps[local, 1]
                elif ref_model is not None:
                    with torch.no_grad(), lora.lora_disabled(ref_model):
                        ref_chosen, ref_rejected = pair_logps(ref_model, ref_model.lm_head_weight, batch,
                                                              run.device, args)
                else:
                    ref_chosen = ref_rejected = None
                # answer tokens of each chosen row (its log-prob is already a per-token mean for IPO)
                chosen_tokens = torch.ones_like(chosen) if args.loss == "ipo" else \
                    batch["chosen_mask"].sum(-1).to(chosen)
                pair_losses, metrics = losses.dpo_loss(
                    chosen, rejected, ref_chosen, ref_rejected, args.beta, args.loss, args.label_smoothing,
                    reference_free=args.reference_free, nll_weight=args.nll_weight,
                    chosen_tokens=chosen_tokens)  # [b]
                pair_losses = pair_losses * weights[local]
                loss = pair_losses.sum() / step_pairs
                (loss * run.world).backward()
            b = len(local)
            totals[:1 + len(pair_metrics)] += torch.stack([pair_losses.detach().sum()]
                                                          + [metrics[n] * b for n in pair_metrics]).float()
            seen += int(batch["attention_mask"].sum())
        totals = run.sum(totals) / step_pairs
        grad_norm, lr = common.optimizer_step(model, opt, sched, float(totals[0]), step + 1, args, run)

        tokens = int(run.sum(torch.tensor(seen)))
        row = {"step": step + 1, "loss": float(totals[0]),
               **{n: float(v) for n, v in zip(metric_names, totals[1:]) if n != "anchor/kl" or anchored},
               "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
               "tokens_per_s": tokens / (time.time() - t0), "s_per_step": time.time() - t0}
        log.write(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
        if args.log_every and (step + 1) % args.log_every == 0:
            run.print(f"step {step + 1}/{len(steps)} loss {row['loss']:.4f} margin {row['rewards/margins']:.3f} "
                      f"acc {row['rewards/accuracies']:.2f} lr {lr:.2e} {row['s_per_step']:.2f}s")
        common.maybe_save_state(run, model, opt, sched, step + 1, len(steps), args)
    bar.close()
    return common.finish(run, model, args)


if __name__ == "__main__":
    common.cli(main)
