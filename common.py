"""What sft.py and dpo.py share: arguments, model setup, optimiser and
schedule, the step plan, checkpoints and resume, logs and curves, and the
distributed setup. The training loops themselves live in the two scripts.

Layout of a run's --out DIR:
    config.json, model.safetensors, tokenizer files   final model (HF layout),
        or adapter_config.json + adapter_model.safetensors with --save-adapter
    train_config.json   resolved arguments and data counts, written at start
    log.jsonl           one line per optimiser step
    curves.png          loss / reward margin / accuracy / lr against step
    state/trainer.pt    resumable state (weights, optimiser, schedule, RNG, step),
                        replaced atomically every --save-every steps
    state/ref_logps.pt  dpo.py --ref precompute: reference log-probs per pair
    finished.json       written last, once the final model is complete (is_finished)

Loss normalisation, the same under gradient accumulation and DDP: the step's
global batch (all micro-batches on all ranks) is known before the first
forward, so each rank's micro-batch loss is its *sum* of per-token (SFT) or
per-pair (DPO) losses divided by the count over the whole global step. Summing
over micro-batches and ranks then gives exactly the one-big-batch mean; DDP
averages gradients over ranks, so each rank multiplies its loss by world size.
"""
import contextlib
import ctypes
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import data
import lora
import model as model_lib


@contextlib.contextmanager
def replacing(path):
    """`with replacing(path) as tmp:` write the new file to `tmp`; on leaving
    the block it replaces `path` in one step (os.replace), so a reader sees the
    old file or the new one, never half of it. On an error the old file stays
    and `tmp` is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path, text: str):
    """Write `text` to `path` through `replacing`."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------
# Arguments

def add_model_args(ap):
    """The starting model and its prompt format (every training script)."""
    ap.add_argument("--ckpt", default=model_lib.DEFAULT_CKPT, help="HF-layout folder, or 'smollm2' (default)")
    ap.add_argument("--template", default=None, help=data.TEMPLATE_HELP)
    ap.add_argument("--system", default=None, help=data.SYSTEM_HELP)


def add_optimizer_args(ap, lr: float):
    """AdamW, the schedule and the batch (every training script, reward.py included)."""
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int, default=0, help="> 0: this many optimiser steps (overrides --epochs)")
    ap.add_argument("--batch-size", type=int, default=8, help="examples (DPO: pairs) per micro-batch, all ranks together")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=-1, help=">= 0 overrides --warmup-ratio")
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="0 = no clipping")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("fp32", "bf16", "auto"), default="fp32",
                    help="bf16 = autocast, fp32 master weights; auto = bf16 where the hardware has bf16 matmuls")


def add_common_args(ap, lr: float):
    """sft.py's and dpo.py's arguments (each adds its own)."""
    add_model_args(ap)
    ap.add_argument("--data", action="append", required=True, help="training file (repeat for several)")
    ap.add_argument("--out", required=True, help="run folder (final checkpoint, logs, state/)")
    add_optimizer_args(ap, lr)
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    ap.add_argument("--grad-checkpointing", action="store_true",
                    help="recompute activations in backward (least memory; fastest that way when run as "
                         "THP_MEM_ALLOC_ENABLE=1 python ..., see return_freed_memory)")
    ap.add_argument("--logprob-impl", choices=("auto", "naive", "chunked", "triton"), default="auto")
    ap.add_argument("--lora-rank", type=int, default=0, help="0 = full fine-tuning")
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--lora-targets", default=",".join(lora.LORA_TARGETS))
    ap.add_argument("--save-adapter", action="store_true", help="with LoRA: save the adapter, not merged weights")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/state/trainer.pt")
    ap.add_argument("--overwrite", action="store_true", help="train into an --out that holds another run")
    ap.add_argument("--log-every", type=int, default=1, help="print a log line every N steps")
    ap.add_argument("--save-every", type=int, default=50, help="write OUT/state every N steps (0 = never)")
    ap.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true", help="no progress bar")
    return ap


def cli(main):
    """Run a script's main; input errors (bad file, field, argument) end as one line on stderr and exit 2."""
    try:
        main()
    except (ValueError, KeyError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        if isinstance(e, OSError) and e.errno == 28:  # ENOSPC
            msg = f"disk full while writing ({e.filename or 'a file'}): free space and rerun (with --resume)"
        print(f"{Path(sys.argv[0]).name}: error: {msg}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0)


# Settings a resumed run may change: they do not change what is computed.
RESUMABLE_CHANGES = {"out", "resume", "overwrite", "quiet", "log_every", "save_every", "logprob_impl",
                     "grad_checkpointing"}


def check_args(args):
    """Ranges of the common numeric arguments (ValueError naming the argument); --lora-* needs --lora-rank."""
    rules = [("lr", args.lr > 0, "> 0"), ("epochs", args.epochs > 0, "> 0"), ("max_steps", args.max_steps >= 0, ">= 0"),
             ("batch_size", args.batch_size >= 1, ">= 1"), ("grad_accum", args.grad_accum >= 1, ">= 1"),
             ("max_len", args.max_len >= 16, ">= 16"), ("weight_decay", args.weight_decay >= 0, ">= 0"),
             ("warmup_ratio", 0 <= args.warmup_ratio < 1, "in [0, 1)"),
             ("max_grad_norm", args.max_grad_norm >= 0, ">= 0 (0 = no clipping)"),
             ("lora_rank", args.lora_rank >= 0, ">= 0"), ("lora_dropout", 0 <= args.lora_dropout < 1, "in [0, 1)"),
             ("log_every", args.log_every >= 0, ">= 0 (0 = never)"), ("save_every", args.save_every >= 0, ">= 0")]
    for name, ok, want in rules:
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {want}")
    lora_set = (args.lora_alpha != 16.0 or args.lora_dropout != 0.0 or args.save_adapter
                or args.lora_targets != ",".join(lora.LORA_TARGETS))
    if lora_set and args.lora_rank == 0:
        raise ValueError("--lora-alpha/--lora-dropout/--lora-targets/--save-adapter apply to LoRA only: "
                         "add --lora-rank R (> 0), or drop them")


def check_out_folder(args):
    """Never lose a run: refuse an --out that is a file, that holds another run (unless --resume or
    --overwrite), or whose saved settings differ from a --resume's."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a folder")
    saved_file = out / "train_config.json"
    held = [f.name for f in (saved_file, out / "log.jsonl", out / "config.json") if f.is_file()]
    if args.resume:
        if not saved_file.is_file():
            return
        try:
            saved = json.loads(saved_file.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{saved_file}: not valid JSON; cannot check that --resume continues the same run")
        now = json.loads(json.dumps(vars(args), default=str))
        changed = sorted(k for k in now if k in saved and k not in RESUMABLE_CHANGES and saved[k] != now[k])
        if changed:
            k = changed[0]
            raise ValueError(f"--resume with other settings than {saved_file}: --{k.replace('_', '-')} was "
                             f"{saved[k]!r}, now {now[k]!r} (only {', '.join(sorted(RESUMABLE_CHANGES - {'out', 'resume'}))} "
                             "may change); use the old value, or start a new run in another --out")
    elif held and not getattr(args, "overwrite", False):
        raise ValueError(f"--out {out} holds another run ({', '.join(held)}): continue it with --resume, "
                         "write to another --out, or pass --overwrite to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror})") from None


# ----------------------------------------------------------------------------
# Distributed (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)

def setup(args) -> "Run":
    """Runtime set-up, first thing in each training script's main; every
    change it makes is here:
      * with --grad-checkpointing, glibc returns freed memory (return_freed_memory);
      * --dtype auto becomes bf16 or fp32 for this device (native_bf16), in args
        itself, so train_config.json records what ran;
      * the arguments and the output folder are checked before any work is done.
    Returns the Run (rank, world size, device, output folder)."""
    run = Run(args)
    if getattr(args, "grad_checkpointing", False):
        return_freed_memory()  # the mode that trades time for memory; see there
    if getattr(args, "dtype", None) == "auto":
        args.dtype = "bf16" if native_bf16(run.device) else "fp32"
    if run.main:
        check_args(args)
        check_out_folder(args)
        run.state_dir.mkdir(parents=True, exist_ok=True)
    return run


class Run:
    """Rank, world size, device and output folder of this process (setup() makes it)."""

    def __init__(self, args):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        self.main = self.rank == 0
        self.out = Path(args.out)
        self.state_dir = self.out / "state"
        self.saved_step = None  # the step of the state in state/trainer.pt, once one is saved
        self.due_state = None  # (step, RNG states) of a state to write once the next step checks out

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of a tensor over ranks (itself when single-process)."""
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x)
        return x

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.world > 1:
            dist.destroy_process_group()

    def print(self, *a):
        if self.main:
            print(*a, flush=True)


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------
# Model

def load_policy(args, device):
    """The model to train: loaded in fp32 (bf16 runs under autocast), with
    gradient checkpointing and LoRA as asked."""
    model = model_lib.load_model(args.ckpt, dtype=torch.float32, device=device)
    model.gradient_checkpointing = args.grad_checkpointing
    if args.lora_rank > 0:
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        lora.add_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, targets)
    elif args.save_adapter:
        raise ValueError("--save-adapter needs LoRA (--lora-rank > 0)")
    return model.train()


def wrap_ddp(model, run):
    if run.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)


def native_bf16(device) -> bool:
    """Is bf16 autocast faster than fp32 here? A GPU from Ampere on; a CPU with AMX
    tiles, or with AVX512-BF16 unless it is an Intel one (there, without AMX,
    PyTorch's bf16 matmuls run slower than its fp32 ones; see docs/performance.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return True
    return getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() and cpu_vendor() != "GenuineIntel"


def cpu_vendor() -> str:
    """The CPU's vendor_id from /proc/cpuinfo (GenuineIntel, AuthenticAMD), or "" where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def autocast(args, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")


# ----------------------------------------------------------------------------
# Optimiser and schedule

def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup from 0 over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, args, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: the update runs in place in one pass, without the per-parameter
    # temporaries of the default loop (the embedding's are 113 MB each for
    # SmolLM2): less peak memory, and faster.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=fused)
    warmup = args.warmup_steps if args.warmup_steps >= 0 else int(args.warmup_ratio * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, warmup))
    return opt, sched


def return_freed_memory():
    """Make glibc give large freed blocks back to the operating system.

    By default glibc serves allocations above a threshold with their own
    mapping, but raises that threshold (up to 32 MiB) each time such a block
    is freed; after that, freed activations and gradients stay in the heap,
    fragmented, and the process's memory grows step after step. Fixing the
    threshold at 128 KiB keeps every large tensor in its own mapping,
    returned at free. The price is time (each fresh mapping's pages fault in
    anew), so the training scripts call this only with --grad-checkpointing,
    the option that already asks for memory over speed.
    Nothing happens on other C libraries; the environment variable
    MALLOC_MMAP_THRESHOLD_ overrides it, and so does THP_MEM_ALLOC_ENABLE=1
    (PyTorch then puts tensors of 2 MiB or more on transparent huge pages, and
    glibc's default heap stays compact). What each costs and saves:
    docs/performance.md, "The allocator"."""
    if sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ \
            or os.environ.get("THP_MEM_ALLOC_ENABLE") == "1":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return
    M_MMAP_THRESHOLD = -3
    libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)


# ----------------------------------------------------------------------------
# Step plan: which examples every optimiser step uses

def plan_steps(lengths, args, world: int) -> list[list[list[int]]]:
    """steps[s] = the micro-batches (global example-index lists) of step s.

    Epoch e's batches come from data.length_grouped_batches(seed, e), so the
    plan is a pure function of the data and the arguments: resuming at step s
    just means starting at steps[s]. Micro-batches with fewer rows than ranks
    (the last one of an epoch) are dropped, since every rank needs a row.
    With --max-steps the epochs repeat (reshuffled) until there are enough.
    """

    micro, epoch = [], 0
    while True:
        batches = [b for b in data.length_grouped_batches(lengths, args.batch_size, args.seed, epoch)
                   if len(b) >= world]
        if args.max_steps <= 0 and epoch + 1 > args.epochs:  # a fractional last epoch
            batches = batches[:int(len(batches) * (args.epochs - epoch))]
        micro += batches
        epoch += 1
        if not batches or (len(micro) >= args.max_steps * args.grad_accum if args.max_steps > 0
                           else epoch >= args.epochs):
            break
    steps = [micro[i:i + args.grad_accum] for i in range(0, len(micro), args.grad_accum)]
    if args.max_steps > 0:
        steps = steps[:args.max_steps]
    if not steps:
        raise ValueError(f"no training steps: {len(lengths)} examples, batch size {args.batch_size}")
    return steps


def padding_report(lengths, batch_size, seed) -> str:

    grouped = data.padding_fraction(data.length_grouped_batches(lengths, batch_size, seed, 0), lengths)
    plain = data.padding_fraction(data.length_grouped_batches(lengths, batch_size, seed, 0, group=1), lengths)
    return f"padding: {grouped:.1%} of slots with length grouping vs {plain:.1%} with random batches"


# ----------------------------------------------------------------------------
# Checkpoints

def rng_states(run) -> list:
    """The RNG state of every rank (a collective call under DDP)."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [None] * run.world
    if run.world > 1:
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    return rngs


def save_state(run, model, opt, sched, step: int, rngs=None):
    """state/trainer.pt: trainable weights, optimiser, schedule, RNG of every
    rank (`rngs`, default: now) and the step; written to a temporary file and
    renamed, so a crash leaves the previous state whole."""
    rngs = rngs or rng_states(run)
    if run.main:
        run.state_dir.mkdir(parents=True, exist_ok=True)
        trainable = {k: v for k, v in model.state_dict().items() if k in _trainable_names(model)}
        if not all(torch.isfinite(v).all() for v in trainable.values()):
            run.print(f"step {step}: weights are not finite; state/ keeps step {run.saved_step}'s state")
            run.barrier()
            return
        state = {"step": step, "model": trainable, "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "rng": rngs}
        with replacing(run.state_dir / "trainer.pt") as tmp:
            torch.save(state, tmp)
        run.saved_step = step
    run.barrier()


def _trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def load_state(run, model, opt, sched) -> int:
    """Restore what save_state wrote; returns the step to continue from."""
    file = run.state_dir / "trainer.pt"
    if not file.is_file():
        raise FileNotFoundError(f"--resume: {file} does not exist (no state saved yet; see --save-every)")
    try:  # weights_only: tensors and plain data only, so a crafted file cannot run code
        state = torch.load(file, map_location=run.device, weights_only=True)
    except Exception as e:
        raise ValueError(f"{file}: not a training state this project wrote, or damaged "
                         f"({type(e).__name__}); delete state/ to start over") from None
    missing = _trainable_names(model) - set(state["model"])
    if missing:
        raise KeyError(f"{file}: no saved weights for {sorted(missing)[:4]}: was it written with other "
                       "--lora-* settings?")
    model.load_state_dict(state["model"], strict=False)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if len(state["rng"]) != run.world:
        raise ValueError(f"{file} was written by {len(state['rng'])} processes, this run has {run.world}")
    rng = state["rng"][run.rank]
    torch.set_rng_state(rng["torch"].cpu())
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"].cpu())
    run.saved_step = state["step"]
    return state["step"]


def maybe_save_state(run, model, opt, sched, done: int, total: int, args):
    """Every --save-every steps (not after the last: the final model follows),
    the state after step `done` is due. It is written by write_due_state once
    the next step's loss and gradient are known to be finite: weights can be
    finite and already broken (--lr 1e30), and state/ must only ever hold
    weights that still give finite numbers. Its RNG is the one of now."""
    if args.save_every and done % args.save_every == 0 and done < total:
        run.due_state = (done, rng_states(run))


def write_due_state(run, model, opt, sched):
    """After check_finite passed, before the optimiser step: the weights, optimiser
    and schedule are still those of the due step, and they gave a finite loss."""
    if run.due_state:
        step, rngs = run.due_state
        save_state(run, model, opt, sched, step, rngs)
        run.due_state = None
        plot_curves(run)


FINISHED = "finished.json"


def mark_finished(folder, **info):
    """Written last into a run folder whose final model is complete (is_finished reads it)."""
    write_atomic(Path(folder) / FINISHED, json.dumps({"finished": True, **info}) + "\n")


def is_finished(folder) -> bool:
    return (Path(folder) / FINISHED).is_file()


def finish(run, model, args) -> str:
    """Final checkpoint and curves into OUT, then the finished marker; returns OUT."""
    save_final(run, model, model.ckpt_dir, args)
    plot_curves(run)
    if run.main:
        mark_finished(run.out)
    run.print(f"saved {run.out}")
    run.barrier()  # no rank tears the process group down while another is still writing
    run.close()
    return str(run.out)


def save_final(run, model, tokenizer_dir, args):
    """The trained model into OUT: merged weights in HF layout, or the adapter.
    save_model writes a complete folder beside OUT, whose files are then moved
    into OUT one by one (each move atomic), keeping logs and state/."""
    if not run.main:
        return
    if args.lora_rank > 0 and args.save_adapter:
        lora.save_adapter(model, run.out, args.ckpt)
        for name in model_lib.TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                (run.out / name).write_bytes((Path(tokenizer_dir) / name).read_bytes())
        save_template_file(run.out, args)
        return
    if args.lora_rank > 0:
        lora.merge_lora(model)
    tmp = run.out.with_name(f".{run.out.name}.final")
    for stale in run.out.parent.glob(f".{run.out.name}.final*"):  # left by a save that was killed
        shutil.rmtree(stale)
    model_lib.save_model(model, tmp, tokenizer_dir=tokenizer_dir)
    save_template_file(tmp, args)
    for f in tmp.iterdir():
        os.replace(f, run.out / f.name)
    tmp.rmdir()


def save_template_file(folder, args):
    """A run trained with --template FILE.jinja ships that template as its
    chat_template.jinja, so the model is prompted as it was trained."""
    if args.template and args.template not in ("chat", *data.BUILT_IN):
        write_atomic(Path(folder) / "chat_template.jinja", Path(args.template).read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------
# Logs

def save_config(run, args, extra: dict):
    """Print the resolved configuration and write OUT/train_config.json."""
    cfg = {**vars(args), "world_size": run.world, "device": str(run.device), **extra}
    if run.main:
        print(json.dumps(cfg, indent=2, default=str), flush=True)
        (run.out / "train_config.json").write_text(json.dumps(cfg, indent=2, default=str))
    return cfg


class StepLog:
    """OUT/log.jsonl, one JSON line per step; on resume, lines after the
    resumed step are dropped so the file reads as one run."""

    def __init__(self, run, start_step: int):
        self.run, self.path = run, run.out / "log.jsonl"
        self.t0 = time.time()
        if run.main:
            old = self.path.read_text().splitlines() if (start_step > 0 and self.path.is_file()) else []
            keep = []
            for n, line in enumerate(old, 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    if n == len(old):  # the last line, torn by a kill mid-write: it is rewritten below
                        break
                    raise ValueError(f"{self.path}:{n}: malformed JSON line; fix or remove it") from None
                if row["step"] <= start_step:
                    keep.append(line)
            self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, row: dict):
        if self.run.main:
            row = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in row.items()}
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def optimizer_step(model, opt, sched, loss: float, step: int, args, run=None) -> tuple[float, float]:
    """The end of every training step, after the backward passes: clip the
    gradient (--max-grad-norm), stop before a non-finite loss or gradient
    reaches the weights, write a state that is due (run's, when given), step
    the optimiser and the schedule, clear the gradients. -> (grad norm, lr used)."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf")))
    check_finite(loss, grad_norm, step, run)
    if run is not None:
        write_due_state(run, model, opt, sched)
    lr = sched.get_last_lr()[0]
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm, lr


def check_finite(loss: float, grad_norm: float, step: int, run=None):
    """Stop before a NaN/inf reaches the weights; state/ keeps the last good step."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise FloatingPointError(
            f"step {step}: loss={loss} grad_norm={grad_norm} is not finite; stopped before the optimiser step. "
            + (f"The last state whose weights still gave a finite loss and gradient is {run.state_dir / 'trainer.pt'} "
               f"(step {run.saved_step}); " if run is not None and run.saved_step is not None else "No state was saved; ")
            + "try a lower --lr, "
            "--dtype fp32, or check the data with `python data.py show`.")


def plot_curves(run, keys=("loss", "rewards/margins", "rewards/accuracies", "lr")):
    """OUT/curves.png from log.jsonl: one panel per metric that was logged."""
    if not run.main or not (run.out / "log.jsonl").is_file():
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run.out / "log.jsonl").read_text().splitlines()]
    keys = [k for k in keys if any(k in r for r in rows)]
    if not rows or not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(run.out / "curves.png", dpi=80)
    plt.close(fig)


def progress(run, total: int, start: int, args, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc=desc, disable=args.quiet or not run.main, file=sys.stderr)
