"""PackedLinear: a fast path for nn.Linear in CPU decoding, beside its plain
twin (nn.Linear itself, which it replaces only inside `packed_linears`)."""
import torch
import torch.nn as nn


class PackedLinear(nn.Module):
    """Inference-only stand-in for an nn.Linear on the CPU (or the lm_head).

    A decoding step multiplies a few rows by every weight matrix. A plain
    F.linear lets the BLAS library repack the whole weight into its blocked
    layout on every call, which costs more than the multiplication itself;
    here the weight is reordered once into oneDNN's layout (for `rows` rows),
    and each step reuses it (bench/bench_generate.py measures it,
    docs/performance.md). The price is a second copy of the weights while it
    lives.
    """

    def __init__(self, weight, bias=None, rows=16):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
        self.bias = bias

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def can_pack(model) -> bool:
    """PackedLinear applies to fp32 weights on a CPU with oneDNN."""
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32 and torch.backends.mkldnn.is_available()


class packed_linears:
    """Within this block every plain nn.Linear of the model is a PackedLinear
    (LoRA layers are left as they are); the originals are put back on exit.

        with packed_linears(model, rows=16):
            ...decode...
    """

    def __init__(self, model, rows):
        self.model, self.rows, self.swapped = model, rows, []

    def __enter__(self):
        for parent in list(self.model.modules()):
            for name, child in parent.named_children():
                if type(child) is nn.Linear:
                    setattr(parent, name, PackedLinear(child.weight, child.bias, self.rows))
                    self.swapped.append((parent, name, child))
        return self

    def __exit__(self, *exc):
        for parent, name, child in self.swapped:
            setattr(parent, name, child)
        self.swapped = []
