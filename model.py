"""A LLaMA-family decoder, written out in full: the network, load and save.

Reads Hugging Face-layout checkpoints (config.json + *.safetensors) of Llama 2,
TinyLlama, Llama 3.x, SmolLM2 and their reward models
(LlamaForSequenceClassification). Parameter names equal the Hugging Face ones,
so a checkpoint's tensors load by name, and `save_model` writes a folder that
`transformers` loads back. Logits match transformers' LlamaForCausalLM to 1e-4
in fp32 (tests/test_model.py). The name "smollm2" stands for the embedded
default, SmolLM2-135M-Instruct, converted once from its GGUF file
(see gguf_convert.py). Generation lives in generation.py, LoRA in lora.py.
"""
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_CKPT = "smollm2"


# ----------------------------------------------------------------------------
# Config

@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None or {"rope_type": "llama3", ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    num_labels: int = 0  # > 0: a reward / classifier model with a `score` head
    raw: dict = field(default_factory=dict, repr=False)  # config.json as read, rewritten on save

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "LlamaConfig":
        def need(key):
            if key not in d:
                raise ValueError(f"{source}: required field '{key}' is missing")
            return d[key]

        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = d.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{source}: '{key}' must be a positive whole number, got {v!r}")

        if d.get("model_type", "llama") not in ("llama", "mistral"):
            raise ValueError(f"{source}: model_type '{d['model_type']}' is not a LLaMA-family model; "
                             "model.py implements model_type 'llama'")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: hidden_act '{act}' is not supported; model.py implements 'silu' (SwiGLU)")
        if d.get("sliding_window") and d.get("model_type") == "mistral":
            raise ValueError(f"{source}: sliding_window attention is not implemented")
        # Newer transformers write rope settings in a `rope_parameters` block.
        rope = dict(d.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or (rope if rope else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind == "default":
                scaling = None
            elif kind != "llama3":
                raise ValueError(f"{source}: rope_scaling type '{kind}' is not implemented by model.py; "
                                 "supported: none/default, llama3")
        heads = need("num_attention_heads")
        archs = d.get("architectures") or ["LlamaForCausalLM"]
        num_labels = 0
        if any("SequenceClassification" in a for a in archs):
            num_labels = int(d.get("num_labels", len(d.get("id2label", {})) or 1))
        return cls(
            vocab_size=need("vocab_size"), hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"), num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or need("hidden_size") // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5), rope_theta=float(theta), rope_scaling=scaling,
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=d.get("attention_bias", False), mlp_bias=d.get("mlp_bias", False),
            num_labels=num_labels, raw=dict(d))


# ----------------------------------------------------------------------------
# The network

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 (as the reference does), then scale in the input dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Rotary frequencies [head_dim/2]; with llama3 scaling, low frequencies are slowed by `factor`."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (> old_len / lo) are divided by factor, short ones (< old_len / hi) kept,
    # and the band between is blended smoothly.
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, blended, scaled)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which of the KV cache's layers this one writes
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=b)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=b)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=b)

    def forward(self, x, rope, mask, layout, cache=None):
        """x: the tokens the layers compute ([B, T, H], or [N, H], see TokenLayout);
        rope: (cos, sin) in the same layout; mask [B, 1, T, keys]."""
        cos, sin = rope
        q = self.q_proj(x).unflatten(-1, (self.n_head, self.hd))  # [..., nh, hd]
        k = self.k_proj(x).unflatten(-1, (self.n_kv, self.hd))
        v = self.v_proj(x).unflatten(-1, (self.n_kv, self.hd))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        q, k, v = (layout.to_batch(t).transpose(1, 2) for t in (q, k, v))  # [B, heads, T, hd]
        if cache is not None:  # write this step's keys/values, attend over everything so far
            k, v = cache.update(self.layer_idx, k, v)
        # Grouped-query attention: each kv head serves n_head / n_kv query heads;
        # enable_gqa does that inside the kernel instead of copying k and v.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_head)  # [B, nh, T, hd]
        y = y.transpose(1, 2).flatten(2)  # [B, T, nh * hd]
        return self.o_proj(layout.to_tokens(y))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        b = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=b)

    def forward(self, x):  # SwiGLU
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, layout, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, layout, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    """LlamaForCausalLM (an `lm_head`, or the embeddings when tied) or, with
    cfg.num_labels > 0, LlamaForSequenceClassification (a `score` head)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        if cfg.num_labels:
            self.score = nn.Linear(cfg.hidden_size, cfg.num_labels, bias=False)
        elif not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False
        # The batch layout (TokenLayout): compute only the real tokens of a padded
        # batch, and the leading tokens alike in every row (a chat template's
        # system prompt) once. Off: every slot of [B, T] is computed, as written.
        self.skip_padding = True
        self.share_prefix = True

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, H]; the embedding matrix itself when the head is tied."""
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def forward(self, input_ids, attention_mask=None, return_hidden=False, cache=None, segments=None):
        """input_ids [B, T], attention_mask [B, T] (1 = token, 0 = padding, either side).
        segments [B, T] (optional, no cache): several answers to one prompt in one
        row, prompt first (segment 0), then each answer as a branch (1, 2, ...)
        that sees the prompt and itself only (see positions_and_mask).

        Returns logits [B, T, V], or with return_hidden the final-norm hidden states
        [B, T, H] (the loss code turns those into log-probs without full logits).
        With `cache` (a generation.KVCache), the tokens are written after those it
        holds and attend to every earlier slot it marks as real. The outputs at
        padding slots carry no meaning.
        """
        positions, mask, layout = self.attention_inputs(input_ids, attention_mask, cache, segments)
        x = self.model.embed_tokens(layout.to_tokens(input_ids))  # [B, T, H], or [N, H] (TokenLayout)
        freqs = layout.to_tokens(positions)[..., None, None].float() * self.inv_freq  # [..., 1, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        rope = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for block in self.model.layers:
            if self.gradient_checkpointing and self.training:  # recompute activations in the backward pass
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, layout, use_reentrant=False)
            else:
                x = block(x, rope, mask, layout, cache)
        h = layout.to_batch(self.model.norm(x))  # [B, T, H]
        if return_hidden:
            return h
        if self.config.num_labels:
            return self.score(h)  # [B, T, num_labels]
        return F.linear(h, self.lm_head_weight)

    def attention_inputs(self, input_ids, attention_mask, cache=None, segments=None):
        """-> positions [B, T], attention mask [B, 1, T, keys], and the TokenLayout."""
        if cache is not None:
            if segments is not None:
                raise ValueError("segments (shared-prompt rows) work without a KV cache only")
            return *cache.positions_and_mask(input_ids.shape[1], attention_mask), TokenLayout.dense()
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        positions, mask = positions_and_mask(valid, segments)
        return positions, mask, self.token_layout(input_ids, valid, segments)

    def token_layout(self, input_ids, valid, segments=None) -> "TokenLayout":
        """Which tokens of this batch the layers compute, by the switches above."""
        return TokenLayout.of(input_ids, valid, segments, self.skip_padding, self.share_prefix)

    def reward_features(self, input_ids, attention_mask, segments=None):
        """The one vector per sequence the score head reads: the final-norm
        hidden state at the sequence's last token. [B, H]: each row's last real
        token (right padding). With segments (a pair batch, data.collate_pairs):
        [B, 2, H], the last token of branch 1 (chosen) and of branch 2 (rejected)."""
        hidden = self(input_ids, attention_mask, return_hidden=True, segments=segments)  # [B, T, H]
        feats = hidden.gather(1, last_token_index(attention_mask, segments)[..., None].expand(-1, -1, hidden.shape[-1]))
        return feats[:, 0] if segments is None else feats

    def reward(self, input_ids, attention_mask, segments=None):
        """Scalar rewards: the score head on `reward_features`. [B], or [B, 2] with segments."""
        return self.score(self.reward_features(input_ids, attention_mask, segments))[..., 0]


# ----------------------------------------------------------------------------
# Batch layout: which tokens the layers compute

class TokenLayout:
    """Every layer but the attention treats tokens one by one, so it need not
    run on padding, nor more than once on leading slots alike in every row (a
    chat template's system prompt): those compute the same thing in every row.
    This object holds which slots of a [B, T] batch are computed, and converts:

        to_tokens  [B, T, ...] -> [N, ...]   the N computed slots (row 0's copy of shared ones)
        to_batch   [N, ...] -> [B, T, ...]   back into the rows: shared slots show row 0's,
                                             padding slots zeros

    The attention goes to_batch before and to_tokens after. With nothing to
    skip (`keep` None) both are the identity. Both have deterministic backward
    passes (an index, and an index_copy plus a sum over the rows)."""

    def __init__(self, keep=None, shared=0, B=0, T=0):
        self.keep, self.shared, self.B, self.T = keep, shared, B, T  # keep [N]: flat slot of each computed token

    @classmethod
    def dense(cls) -> "TokenLayout":
        return cls()

    @classmethod
    def of(cls, input_ids, valid, segments=None, skip_padding=True, share_prefix=True) -> "TokenLayout":
        B, T = valid.shape
        shared = shared_prefix_length(input_ids, valid, segments) if share_prefix else 0
        computed = valid.clone() if skip_padding else torch.ones_like(valid)
        if not shared and computed.all():
            return cls.dense()
        computed[1:, :shared] = False
        return cls(computed.flatten().nonzero().squeeze(1), shared, B, T)

    def num_tokens(self, input_ids) -> int:
        return input_ids.numel() if self.keep is None else len(self.keep)

    def to_tokens(self, t):
        return t if self.keep is None else t.flatten(0, 1)[self.keep]

    def to_batch(self, t):
        if self.keep is None:
            return t
        out = t.new_zeros(self.B * self.T, *t.shape[1:]).index_copy(0, self.keep, t).unflatten(0, (self.B, self.T))
        if self.shared:
            beginning = out[:1, :self.shared].expand(self.B, *[-1] * (out.dim() - 1))
            out = torch.cat([beginning, out[:, self.shared:]], dim=1)
        return out


def shared_prefix_length(input_ids, valid, segments=None) -> int:
    """How many leading slots hold the same real token (and segment) in every
    row of a batch of two or more. Those slots compute the same thing in every
    row: causal attention sees only earlier slots, which are alike too."""
    if input_ids.shape[0] < 2:
        return 0
    alike = valid.all(0) & (input_ids == input_ids[:1]).all(0)  # [T]
    if segments is not None:
        alike &= (segments == segments[:1]).all(0)
    return int(alike.long().cumprod(0).sum())


def last_token_index(attention_mask: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
    """Where a reward is read: [B, 1], each row's last real token; with
    segments (pair rows) [B, 2], the last token of branch 1 and of branch 2."""
    ends = [attention_mask.bool()] if segments is None else [segments == 1, segments == 2]
    return torch.stack([m.long().cumsum(-1).argmax(-1) for m in ends], 1)  # index of the last True


def positions_and_mask(valid: torch.Tensor, segments: torch.Tensor | None = None):
    """valid [B, T] bool -> positions [B, T] and attention mask [B, 1, T, T].

    A query may see earlier real keys, and its position is the number of real
    keys it sees before itself: a left-padded row gets the same positions as
    the unpadded one. Padding queries see themselves, so no softmax row is
    empty (their outputs are unused).

    segments [B, T]: a shared prefix (0) followed by branches (1, 2, ...). A
    branch token sees the prefix and the earlier tokens of its own branch,
    nothing of the other branches, so each branch computes exactly what the
    sequence prefix + branch would alone, positions included. A DPO row
    [prompt | chosen | rejected] (data.collate_pairs) thus runs the prompt once.
    """
    T = valid.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    mask = causal[None] & valid[:, None, :]  # [B, query, key]
    if segments is not None:
        key_seg, query_seg = segments[:, None, :], segments[:, :, None]
        mask = mask & ((key_seg == 0) | (key_seg == query_seg))
    positions = (mask.sum(-1) - 1).clamp(min=0)  # real keys seen (itself included) - 1
    mask = mask | torch.eye(T, dtype=torch.bool, device=valid.device)[None]
    return positions, mask[:, None]



# ----------------------------------------------------------------------------
# Loading and saving (Hugging Face layout)

def resolve_ckpt(ckpt) -> Path:
    """A folder path, or the embedded default's name -> folder in Hugging Face layout."""
    if ckpt in (None, DEFAULT_CKPT):
        import gguf_convert
        return gguf_convert.smollm2_dir()
    path = Path(ckpt)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder '{ckpt}' does not exist (expected a Hugging Face-layout "
                                f"folder with config.json and *.safetensors, or '{DEFAULT_CKPT}')")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}/config.json is missing: not a Hugging Face-layout checkpoint")
    return path


def read_config(path: Path) -> LlamaConfig:
    file = path / "config.json"
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    return LlamaConfig.from_dict(d, str(file))


def _read_index(index: Path) -> dict:
    try:
        obj = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{index}: not valid JSON ({e}); the download may be truncated") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("weight_map"), dict):
        raise ValueError(f"{index}: no 'weight_map' object (tensor name -> shard file)")
    return obj


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_index(index)["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {missing}")
        return [path / s for s in shards]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if list(path.glob("*.bin")):
        raise FileNotFoundError(f"{path} holds only PyTorch .bin weights; convert them to safetensors "
                                "(e.g. transformers' save_pretrained(safe_serialization=True))")
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_model(ckpt=DEFAULT_CKPT, dtype=None, device=None) -> Llama:
    """Build the model on the meta device, then fill it tensor by tensor from
    the safetensors files: each weight is read, cast and moved once, so no second
    full copy of the weights is ever held. dtype defaults to fp32 on CPU and
    the checkpoint's own dtype (bf16 if unsaid) on CUDA."""
    from safetensors import safe_open

    path = resolve_ckpt(ckpt)
    cfg = read_config(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        saved = cfg.raw.get("torch_dtype") or cfg.raw.get("dtype") or "bfloat16"
        dtype = torch.float32 if device.type == "cpu" else getattr(torch, saved, torch.bfloat16)
    elif isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype) \
            or getattr(torch, dtype)
    with torch.device("meta"):
        model = Llama(cfg)
    expected = dict(model.named_parameters())
    seen = set()
    index = path / "model.safetensors.index.json"
    owner = _read_index(index)["weight_map"] if index.is_file() else {}  # tensor -> the shard the index names
    for file in weight_files(path):
        try:
            f = safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error type for a torn or foreign file
            raise ValueError(f"{file}: not a readable safetensors file ({e}); the download may be truncated") \
                from None
        with f:
            for name in f.keys():
                if owner and owner.get(name) != file.name:
                    continue  # a stale copy in another shard: the index says where each tensor lives
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # old checkpoints store rope frequencies; they are recomputed
                if name == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue  # some tied checkpoints also store the (identical) head
                if name not in expected:
                    raise KeyError(f"{file}: tensor '{name}' is not a parameter of this model "
                                   f"(config {path / 'config.json'} describes a LLaMA model; is it another architecture?)")
                t = f.get_tensor(name)
                if tuple(t.shape) != tuple(expected[name].shape):
                    raise ValueError(f"{file}: tensor '{name}' has shape {tuple(t.shape)}, but config.json implies "
                                     f"{tuple(expected[name].shape)}")
                if not torch.isfinite(t).all():  # a broken model would answer "" to everything
                    raise ValueError(f"{file}: tensor '{name}' holds NaN or infinite values; this checkpoint "
                                     "is broken (a diverged run?) and cannot be used")
                set_param(model, name, t.to(device=device, dtype=dtype))
                seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise KeyError(f"{path}: tensors missing from the checkpoint: {missing[:8]}"
                       f"{' ...' if len(missing) > 8 else ''}")
    model.inv_freq = rope_inv_freq(cfg).to(device)
    model.ckpt_dir = path  # where the tokenizer files live; save_model copies them
    return model.eval()


def set_param(model: nn.Module, name: str, tensor: torch.Tensor):
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, nn.Parameter(tensor, requires_grad=True))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


def save_model(model: Llama, out_dir, tokenizer_dir=None, max_shard_bytes=2 * 1024**3, dtype=None):
    """Write config.json, model.safetensors (or shards + model.safetensors.index.json
    above max_shard_bytes) and the tokenizer files, into a temporary folder
    beside out_dir that is then renamed into place: a crash never leaves a
    half-written checkpoint, and an existing out_dir is replaced whole."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in model.state_dict().items()}
        saved_dtype = next(iter(state.values())).dtype
        cfg = dict(model.config.raw)
        cfg.update(model_type=cfg.get("model_type", "llama"), torch_dtype=str(saved_dtype).replace("torch.", ""),
                   architectures=["LlamaForSequenceClassification" if model.config.num_labels else "LlamaForCausalLM"])
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        shards, size = [[]], 0
        for name, t in state.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        if len(shards) == 1:
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, names in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file({n: state[n] for n in names}, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({n: fname for n in names})
            total = sum(t.numel() * t.element_size() for t in state.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        src = Path(tokenizer_dir or getattr(model, "ckpt_dir", "") or "")
        for name in TOKENIZER_FILES:
            if src.name and (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
