"""Supervised fine-tuning, and the paper's safety-tuned SIT: SFT on the
instruction data plus N safety demonstrations (harmful request -> safe answer).

    python sft.py --data demo_data/sit_train.json --out runs/sit
    python sft.py --data alpaca.json --safety-data safety.json --n-safety 500 --out runs/sit500
    torchrun --nproc_per_node 2 sft.py --data ... --out ...

Loss: the mean negative log-likelihood of the answer tokens (prompt and
padding masked; see data.py), every trained token of an optimiser step
weighted the same (losses.sft_loss, common.py for accumulation and DDP).
Shared machinery (arguments, checkpoints, logs, DDP) is in common.py.
"""
import argparse
import contextlib
import time

import torch

import common
import data
import losses


def build_parser():
    ap = argparse.ArgumentParser(description="SFT / SIT (safety-tuned instruction tuning)")
    common.add_common_args(ap, lr=2e-5)
    ap.add_argument("--safety-data", default=None, help="safety demonstrations (Alpaca JSON or JSONL)")
    ap.add_argument("--n-safety", type=int, default=0, help="how many safety demonstrations to mix in")
    return ap


def load_examples(args):
    stats = {}
    examples = [ex for path in args.data for ex in data.load_instructions(path, stats)]
    stats["instructions"] = len(examples)
    if args.n_safety < 0:
        raise ValueError(f"--n-safety {args.n_safety}: must be >= 0")
    if args.safety_data and args.n_safety == 0:
        raise ValueError("--safety-data needs --n-safety N (> 0): how many of its demonstrations to mix in")
    if args.n_safety > 0:
        if not args.safety_data:
            raise ValueError("--n-safety needs --safety-data FILE")
        safety = data.load_instructions(args.safety_data, stats)
        examples = data.mix_sit(examples, safety, args.n_safety, args.seed)
        stats["safety"] = args.n_safety
    return examples, stats


def main(argv=None):
    """Train; returns the output folder (raft.py calls this in-process)."""
    args = build_parser().parse_args(argv)
    run = common.setup(args)
    common.seed_everything(args.seed + run.rank)
    tok = data.load_tokenizer(args.ckpt, args.template, args.system)
    examples, load_stats = load_examples(args)
    train, tok_stats = data.tokenize_sft(tok, examples, args.max_len)
    lengths = [len(e["input_ids"]) for e in train]
    steps = common.plan_steps(lengths, args, run.world)
    model = common.load_policy(args, run.device)
    net = common.wrap_ddp(model, run)
    opt, sched = common.make_optimizer(model, args, len(steps))
    run.print(data.describe_template(tok))
    common.save_config(run, args, {"prompt_template": data.template_info(tok), "data_stats": load_stats,
                                   "tokenize_stats": tok_stats, "steps": len(steps),
                                   "padding": common.padding_report(lengths, args.batch_size, args.seed)})
    start = common.load_state(run, model, opt, sched) if args.resume else 0
    log = common.StepLog(run, start)
    bar = common.progress(run, len(steps), start, args, "sft")

    for step in range(start, len(steps)):
        t0 = time.time()
        micro = steps[step]
        # trained tokens of the whole step, all ranks: the loss denominator
        step_tokens = sum(len(train[i]["input_ids"]) - train[i]["n_prompt"] for b in micro for i in b)
        loss_sum = torch.zeros((), device=run.device)
        seen = 0
        for k, indices in enumerate(micro):
            batch = data.collate_sft([train[i] for i in indices[run.rank::run.world]], tok.pad_id)
            ids, att, mask = (batch[key].to(run.device) for key in ("input_ids", "attention_mask", "loss_mask"))
            # DDP all-reduces gradients after the last micro-batch only
            sync_later = net.no_sync() if run.world > 1 and k < len(micro) - 1 else contextlib.nullcontext()
            with sync_later, common.autocast(args, run.device):
                hidden = net(ids, att, return_hidden=True)  # [b, T, H]
                token_logps = losses.response_token_logps(hidden, model.lm_head_weight, ids, mask,
                                                          args.logprob_impl)  # [b, T-1]
                loss, metrics = losses.sft_loss(token_logps, mask[:, 1:], step_tokens)
                (loss * run.world).backward()
            loss_sum += metrics["loss"]
            seen += int(att.sum())
        loss_value = float(run.sum(loss_sum))
        grad_norm, lr = common.optimizer_step(model, opt, sched, loss_value, step + 1, args, run)

        tokens = int(run.sum(torch.tensor(seen)))
        row = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
               "tokens": tokens, "tokens_per_s": tokens / (time.time() - t0)}
        log.write(row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if args.log_every and (step + 1) % args.log_every == 0:
            run.print(f"step {step + 1}/{len(steps)} loss {loss_value:.4f} lr {lr:.2e} gnorm {grad_norm:.3f}")
        common.maybe_save_state(run, model, opt, sched, step + 1, len(steps), args)
    bar.close()
    return common.finish(run, model, args)


if __name__ == "__main__":
    common.cli(main)
