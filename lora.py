"""LoRA adapters for model.Llama: add, switch off, merge, save and load."""
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


# LoRA (Hu et al. 2021): W x + (alpha / r) * B A dropout(x), with A [r, in]
# random and B [out, r] zero, so training starts from the base model exactly.
# Parameter names follow PEFT (q_proj.lora_A.weight, q_proj.lora_B.weight), so
# a saved adapter reads like a PEFT one.


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Linear):
    """An nn.Linear that keeps its own weight/bias (same names as before, frozen)
    and adds a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # what nn.Linear itself uses
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.lora_enabled = True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.lora_enabled:
            return y
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scale


def add_lora(model: nn.Module, rank: int, alpha: float = 16.0, dropout: float = 0.0, targets=LORA_TARGETS):
    """Wrap every nn.Linear whose name ends in one of `targets`; freeze all other
    parameters. Returns the model (changed in place)."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be > 0, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    found = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and name.split(".")[-1] in targets:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, LoRALinear(module, rank, alpha, dropout))
            found += 1
    if not found:
        raise ValueError(f"no linear layer is named one of {list(targets)}; this model's names are like "
                         f"{[n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:4]}")
    model.lora_config = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": list(targets)}
    return model


def lora_modules(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module):
    """Fold each adapter into its weight (W += scale * B A) and put plain
    nn.Linear layers back, so the model saves in the ordinary layout."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              device="meta")
            with torch.no_grad():
                delta = (module.lora_B.weight.float() @ module.lora_A.weight.float()) * module.scale  # [out, in]
                plain.weight = nn.Parameter(module.weight + delta.to(module.weight.dtype))
                if module.bias is not None:
                    plain.bias = module.bias
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    model.__dict__.pop("lora_config", None)
    return model


class lora_disabled:
    """`with lora_disabled(model):` runs the base model (adapters off); the DPO
    reference with LoRA is the policy itself with this switch on."""

    def __init__(self, model):
        self.modules = lora_modules(model)

    def __enter__(self):
        for m in self.modules:
            m.lora_enabled = False

    def __exit__(self, *exc):
        for m in self.modules:
            m.lora_enabled = True


def save_adapter(model: nn.Module, out_dir, base_ckpt=None):
    """PEFT-style adapter folder: adapter_config.json + adapter_model.safetensors
    (tensor names prefixed "base_model.model."), written atomically."""
    from safetensors.torch import save_file

    if not lora_modules(model):
        raise ValueError("save_adapter: the model has no LoRA layers (add_lora was not called)")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    state = {f"base_model.model.{k}": v.detach().contiguous().cpu()
             for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}
    save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none",
           "base_model_name_or_path": str(base_ckpt or getattr(model, "ckpt_dir", "")), **model.lora_config}
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    if out_dir.exists():
        for f in tmp.iterdir():  # the run folder holds other files too: replace only these two
            os.replace(f, out_dir / f.name)
        shutil.rmtree(tmp)
    else:
        tmp.rename(out_dir)
    return out_dir


def load_adapter(model: nn.Module, adapter_dir):
    """add_lora with the saved config, then load the saved A and B weights."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} is missing: not a LoRA adapter folder")
    cfg = json.loads(cfg_file.read_text())
    add_lora(model, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0), cfg["target_modules"])
    state = {k.removeprefix("base_model.model."): v for k, v in
             load_file(str(adapter_dir / "adapter_model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(".lora_" in k for k in missing):
        raise KeyError(f"{adapter_dir}: adapter tensors do not match the model (unexpected {unexpected[:4]})")
    return model
