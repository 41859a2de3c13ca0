"""A LLaMA-family decoder, written out in full: load, run, sample, save.

    python model.py --ckpt smollm2 "What is the capital of France?"

Reads Hugging Face-layout checkpoints (config.json + *.safetensors) of Llama 2,
TinyLlama, Llama 3.x, SmolLM2 and their reward models
(LlamaForSequenceClassification). Parameter names equal the Hugging Face ones,
so a checkpoint's tensors load by name, and `save_model` writes a folder that
`transformers` loads back. Logits match transformers' LlamaForCausalLM to 1e-4
in fp32 (tests/test_model.py). The name "smollm2" stands for the embedded
default, SmolLM2-135M-Instruct, converted once from its GGUF file
(see gguf_convert.py).
"""
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import typing
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
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=b)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=b)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=b)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, start=0, rows=None):
        """x [B, T, H]; or, with `rows` (Llama.forward's TokenRows), only the
        tokens computed [N, H]: they go back into their rows just for the attention."""
        q = self.q_proj(x).unflatten(-1, (self.n_head, self.hd))  # [B, T, nh, hd] or [N, nh, hd]
        k = self.k_proj(x).unflatten(-1, (self.n_kv, self.hd))
        v = self.v_proj(x).unflatten(-1, (self.n_kv, self.hd))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if rows is not None:
            q, k, v = (to_rows(t, rows) for t in (q, k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, hd]
        if cache is not None:  # write this step's keys/values, attend over everything so far
            k, v = cache.update(layer, start, k, v)
        # Grouped-query attention: each kv head serves n_head / n_kv query heads;
        # enable_gqa does that inside the kernel instead of copying k and v.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_head)  # [B, nh, T, hd]
        y = y.transpose(1, 2).flatten(2)  # [B, T, nh * hd]
        if rows is not None:
            y = y.flatten(0, 1)[rows.keep]  # back to the computed tokens [N, nh * hd]
        return self.o_proj(y)


class TokenRows(typing.NamedTuple):
    """Which slots of a [B, T] batch the layers compute (Llama.forward).
    keep [N]: the flat slot of each computed token; the first `shared` slots
    are computed in row 0 only, and rows 1.. show row 0's."""
    keep: torch.Tensor
    shared: int
    B: int
    T: int


def to_rows(t, rows):
    """Computed tokens [N, ...] -> [B, T, ...]: each slot gets its token, the
    shared slots row 0's in every row, zeros at the padding slots. (Both steps
    have deterministic backward passes: a gather, and a sum over the rows.)"""
    out = t.new_zeros(rows.B * rows.T, *t.shape[1:]).index_copy(0, rows.keep, t).unflatten(0, (rows.B, rows.T))
    if rows.shared:
        beginning = out[:1, :rows.shared].expand(rows.B, *[-1] * (out.dim() - 1))
        out = torch.cat([beginning, out[:, rows.shared:]], dim=1)
    return out


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
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, start=0, rows=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, start, rows)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
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

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, H]; the embedding matrix itself when the head is tied."""
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def forward(self, input_ids, attention_mask=None, return_hidden=False, cache=None, start=0, segments=None):
        """input_ids [B, T], attention_mask [B, T] (1 = token, 0 = padding, either side).
        segments [B, T] (optional, no cache): several answers to one prompt in one
        row, prompt first (segment 0), then each answer as a branch (1, 2, ...)
        that sees the prompt and itself only (see positions_and_mask).

        Returns logits [B, T, V], or with return_hidden the final-norm hidden states
        [B, T, H] (the loss code turns those into log-probs without full logits).
        With `cache` (a KVCache), the tokens are written at slots start..start+T-1
        and attend to every earlier slot the cache marks as real. Without one,
        padding is skipped: the outputs at padding slots are those of a zero
        hidden state, and carry no meaning.
        """
        B, T = input_ids.shape
        rows = None
        if cache is not None:
            if segments is not None:
                raise ValueError("segments (shared-prompt rows) work without a KV cache only")
            positions, mask = cache.positions_and_mask(start, T, attention_mask)
        else:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            valid = attention_mask.bool()
            positions, mask = positions_and_mask(valid, segments)
            # Every layer but the attention runs on each distinct real token
            # once ([N, H] instead of [B, T, H]): padding costs no matmuls, and
            # leading slots alike in every row (a chat template's system
            # prompt) run in row 0 only.
            rows = token_rows(input_ids, valid, segments)
            if rows is not None:
                input_ids, positions = input_ids.flatten()[rows.keep], positions.flatten()[rows.keep]
        x = self.model.embed_tokens(input_ids)
        freqs = positions[..., None, None].float() * self.inv_freq  # [B, T, 1, hd/2] or [N, 1, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, block in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, None, i, 0, rows, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i, start, rows)
        h = self.model.norm(x)
        if rows is not None:
            h = to_rows(h, rows)  # [B, T, H], zeros at padding
        if return_hidden:
            return h
        if self.config.num_labels:
            return self.score(h)  # [B, T, num_labels]
        return F.linear(h, self.lm_head_weight)

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


def token_rows(input_ids, valid, segments=None) -> TokenRows | None:
    """The slots a forward pass computes: every real slot, except the leading
    slots of rows 1.. that row 0 holds alike (shared_prefix_length). None when
    that is every slot."""
    B, T = valid.shape
    shared = shared_prefix_length(input_ids, valid, segments)
    if not shared and valid.all():
        return None
    computed = valid.clone()
    computed[1:, :shared] = False
    return TokenRows(computed.flatten().nonzero().squeeze(1), shared, B, T)


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
# KV cache and generation

class KVCache:
    """Preallocated keys/values [layers, B, n_kv, max_len, hd] plus which slots hold real tokens."""

    def __init__(self, cfg: LlamaConfig, batch: int, max_len: int, device, dtype):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)  # rope position of the next token

    def positions_and_mask(self, start, T, attention_mask):
        """Positions [B, T] and mask [B, 1, T, start+T] for T new tokens written at
        `start`: the same conventions as `positions_and_mask` above, kept across calls."""
        B = self.valid.shape[0]
        new = torch.ones(B, T, dtype=torch.bool, device=self.valid.device) if attention_mask is None \
            else attention_mask.bool()
        self.valid[:, start:start + T] = new
        positions = self.next_pos[:, None] + (new.long().cumsum(-1) - 1).clamp(min=0)
        self.next_pos += new.long().sum(-1)
        S = start + T
        causal = torch.ones(T, S, dtype=torch.bool, device=new.device).tril(diagonal=start)
        mask = causal[None] & self.valid[:, None, :S]
        mask[:, torch.arange(T), start + torch.arange(T)] = True  # padding queries see themselves
        return positions, mask[:, None]

    def update(self, layer, start, k, v):
        T = k.shape[2]
        self.k[layer, :, :, start:start + T] = k
        self.v[layer, :, :, start:start + T] = v
        return self.k[layer, :, :, :start + T], self.v[layer, :, :, :start + T]

    def repeat(self, n: int):
        """Each row becomes n consecutive rows (K samples share one prefilled prompt)."""
        self.k = self.k.repeat_interleave(n, dim=1)
        self.v = self.v.repeat_interleave(n, dim=1)
        self.valid = self.valid.repeat_interleave(n, dim=0)
        self.next_pos = self.next_pos.repeat_interleave(n, dim=0)


class PackedLinear(nn.Module):
    """Inference-only stand-in for an nn.Linear on the CPU (or the lm_head).

    A decoding step multiplies a few rows by every weight matrix. A plain
    F.linear lets the BLAS library repack the whole weight into its blocked
    layout on every call, which costs more than the multiplication itself;
    here the weight is reordered once into oneDNN's layout (for `rows` rows),
    and each step reuses it: about 2x faster for SmolLM2's decoding steps on
    2 cores (bench/bench_generate.py). The price is a second copy of the
    weights while it lives.
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


def sample_next(logits, temperature=0.0, top_p=1.0, top_k=0, generator=None, candidates=1024):
    """logits [B, V] -> next token [B]. temperature 0 = greedy.

    top-k keeps the k most likely tokens; top-p then keeps the smallest set of
    the most likely ones whose probability reaches top_p (after top-k, as in
    transformers). Sorting the whole vocabulary every step is slow, so only the
    `candidates` most likely tokens are sorted (torch.topk); when some row's
    nucleus does not fit in them, every token is sorted instead. Exact either way.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    V = logits.shape[-1]
    if top_k <= 0 and top_p >= 1.0:  # plain sampling from the whole distribution
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
    k = min(top_k, V) if top_k > 0 else min(candidates, V) if top_p < 1.0 else V
    vals, idx = logits.topk(k, dim=-1)  # [B, k], most likely first
    # Probabilities of the candidates: over the top-k set with top-k, over the whole vocabulary without.
    probs = (vals - (vals if top_k > 0 else logits).logsumexp(-1, keepdim=True)).exp()
    if top_k <= 0 and k < V and bool((probs.sum(-1) < top_p).any()):
        return sample_next(logits, 1.0, top_p, 0, generator, candidates=V)  # nucleus wider than the candidates
    if top_p < 1.0:
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        probs = probs.masked_fill(drop, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)  # [B, 1], renormalises the kept mass
    return idx.gather(-1, choice)[:, 0]


@torch.inference_mode()
def generate(model, tokenizer, prompts, max_new_tokens=120, temperature=0.0, top_p=1.0, top_k=0,
             num_samples=1, seed=0, batch_size=16, progress=False, pack=None):
    """Answer each prompt `num_samples` times. Returns a list (one per prompt) of
    lists (one per sample) of dicts {"ids": [...], "text": str, "finished": bool}.

    prompts: strings, rendered with the tokenizer's template (data.encode_prompt),
    or lists of token ids used as they are. Rows are left-padded and prefilled
    once; with num_samples > 1 each prompt's prefilled cache is copied to its K
    rows, so a prompt's tokens are processed once, not K times. A row stops at
    any of the tokenizer's stop ids (EOS, <|im_end|>, <|eot_id|>, ...);
    `finished` is False when it ran out of new tokens instead. The same seed
    gives the same samples (for the same batch_size). pack (default: on a CPU
    with oneDNN) runs the linear layers as PackedLinear while generating.
    """
    import data  # templates live with the tokenizer
    from tqdm import tqdm

    device = next(model.parameters()).device
    encoded = [p if isinstance(p, list) else data.encode_prompt(tokenizer, p) for p in prompts]
    positions = model.config.raw.get("max_position_embeddings")
    too_long = next((i for i, ids in enumerate(encoded) if positions and len(ids) + max_new_tokens > positions), None)
    if too_long is not None:  # past its positions the model answers garbage, silently
        raise ValueError(f"prompt {too_long} has {len(encoded[too_long])} tokens: with max_new_tokens "
                         f"{max_new_tokens} that passes the model's max_position_embeddings {positions}; "
                         "shorten the prompt or lower max_new_tokens")
    stop = torch.tensor(sorted(tokenizer.stop_ids), device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = []
    per_batch = max(1, batch_size // num_samples)
    pack = can_pack(model) if pack is None else pack
    rows = per_batch * num_samples
    packing = packed_linears(model, rows) if pack else contextlib.nullcontext()
    head = PackedLinear(model.lm_head_weight, rows=rows) if pack else \
        (lambda h: F.linear(h, model.lm_head_weight))
    with packing:
        for s in tqdm(range(0, len(encoded), per_batch), desc="generate", disable=not progress, leave=False):
            out += _generate_batch(model, tokenizer, head, encoded[s:s + per_batch], max_new_tokens, temperature,
                                   top_p, top_k, num_samples, stop, generator)
    model.train(was_training)
    return out


def _generate_batch(model, tokenizer, head, chunk, max_new_tokens, temperature, top_p, top_k, num_samples,
                    stop, generator):
    """generate() for one batch of prompts (token lists): prefill, then decode."""
    device = stop.device
    dtype = next(model.parameters()).dtype
    out = []
    P, L = len(chunk), max(len(c) for c in chunk)
    ids = torch.full((P, L), tokenizer.pad_id, dtype=torch.long, device=device)
    att = torch.zeros(P, L, dtype=torch.long, device=device)
    for i, c in enumerate(chunk):  # left padding: every row's last prompt token sits at slot L-1
        ids[i, L - len(c):] = torch.tensor(c, device=device)
        att[i, L - len(c):] = 1
    cache = KVCache(model.config, P, L + max_new_tokens, device, dtype)
    h = model(ids, att, return_hidden=True, cache=cache, start=0)[:, -1]  # [P, H]
    logits = head(h)  # only the last position's logits are needed
    if num_samples > 1:
        cache.repeat(num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)
    B = P * num_samples
    new = torch.full((B, max_new_tokens), tokenizer.pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n = 0
    for n in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_p, top_k, generator)
        tok = torch.where(done, tokenizer.pad_id, tok)
        new[:, n] = tok
        done |= torch.isin(tok, stop)
        if bool(done.all()) or n == max_new_tokens - 1:
            break
        step_mask = (~done).long()[:, None]  # finished rows feed padding that nothing attends to
        logits = head(model(tok[:, None], step_mask, return_hidden=True, cache=cache, start=L + n)[:, -1])
    new = new[:, :n + 1].tolist()
    for i in range(P):
        row = []
        for j in range(num_samples):
            toks = new[i * num_samples + j]
            cut = next((t for t, x in enumerate(toks) if x in tokenizer.stop_ids), None)
            ids_ = toks if cut is None else toks[:cut]
            row.append({"ids": ids_, "text": tokenizer.decode(ids_), "finished": cut is not None})
        out.append(row)
    return out


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


# ----------------------------------------------------------------------------
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


def main(argv=None):
    import argparse
    import data

    ap = argparse.ArgumentParser(description="Load a checkpoint and answer prompts.")
    ap.add_argument("prompts", nargs="*", default=["What is the capital of France?"])
    ap.add_argument("--ckpt", default=DEFAULT_CKPT)
    ap.add_argument("--max-new-tokens", type=int, default=120)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model = load_model(args.ckpt)
    tok = data.load_tokenizer(args.ckpt)
    res = generate(model, tok, args.prompts, args.max_new_tokens, args.temperature, args.top_p, seed=args.seed)
    for p, r in zip(args.prompts, res):
        print(f"### {p}\n{r[0]['text']}\n")


if __name__ == "__main__":
    sys.exit(main())
