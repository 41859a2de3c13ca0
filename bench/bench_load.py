"""Peak memory while loading a checkpoint: must stay <= 2x the size of its weights.

    python bench/bench_load.py [--ckpt smollm2] [--dtype fp32]

Runs the load in a fresh subprocess and reads its peak resident set size
(ru_maxrss) after the load and after touching every weight (safetensors may
hand out memory-mapped tensors whose pages are read lazily), minus the peak measured after importing torch
and our modules, i.e. the memory the load itself added at its worst moment.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, resource, sys
sys.path.insert(0, {root!r})
import torch, safetensors, model
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = model.load_model({ckpt!r}, dtype={dtype!r})
with torch.no_grad():  # touch every weight, so memory-mapped pages count as resident too
    total = sum(float(p.sum()) for p in m.parameters())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
weights = sum(p.numel() * p.element_size() for p in m.parameters())
print(json.dumps({{"base_kb": base, "peak_kb": peak, "weights_bytes": weights}}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="smollm2")
    ap.add_argument("--dtype", default="fp32")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import model
    model.resolve_ckpt(args.ckpt)  # convert the default once, outside the measured process
    code = CHILD.format(root=str(ROOT), ckpt=args.ckpt, dtype=args.dtype)
    out = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                    text=True).stdout.strip().splitlines()[-1])
    added = (out["peak_kb"] - out["base_kb"]) * 1024
    w = out["weights_bytes"]
    print(f"weights: {w / 2**20:.0f} MiB; peak RSS added by load_model: {added / 2**20:.0f} MiB")
    print(f"ratio peak / weights: {added / w:.2f}x  (goal <= 2x)")


if __name__ == "__main__":
    main()
