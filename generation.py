"""Answering prompts: the KV cache, sampling (greedy, temperature, top-k,
top-p) and batched `generate`, which eval.py, raft.py and the distill stage
use.

    python generation.py --ckpt smollm2 "What is the capital of France?"

A batch of prompts is left-padded and prefilled once; each decoding step then
runs one token per row through model.Llama with the cache. On a CPU with
oneDNN the linear layers run as kernels.packed_linear.PackedLinear meanwhile.
In greedy decoding, rows that have finished leave the batch (and the cache)
once a quarter of those still running has, so that a batch of mostly short
answers does not keep paying for its finished rows until the longest ends.
"""
import argparse
import contextlib
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data  # prompts are rendered with the tokenizer's template
import model as model_lib
from kernels.packed_linear import PackedLinear, can_pack, packed_linears


class KVCache:
    """Preallocated keys/values [layers, B, n_kv, max_len, hd] plus which slots hold real tokens."""

    def __init__(self, cfg: model_lib.LlamaConfig, batch: int, max_len: int, device, dtype):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)  # rope position of the next token
        self.length = 0  # slots written so far; the next forward pass writes from here
        self.start = 0  # where the current forward pass writes

    def positions_and_mask(self, T, attention_mask):
        """Begins a forward pass of T new tokens, written after those held:
        positions [B, T] and mask [B, 1, T, start+T], the conventions of
        model.positions_and_mask, kept across calls."""
        B = self.valid.shape[0]
        start = self.start = self.length
        self.length += T
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

    def update(self, layer, k, v):
        """Layer `layer` writes this pass's keys/values [B, n_kv, T, hd]; -> all its keys/values so far."""
        start, T = self.start, k.shape[2]
        self.k[layer, :, :, start:start + T] = k
        self.v[layer, :, :, start:start + T] = v
        return self.k[layer, :, :, :start + T], self.v[layer, :, :, :start + T]

    def keep(self, rows):
        """Only these rows (a LongTensor of indices) go on; the others leave the cache."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self.valid, self.next_pos = self.valid[rows], self.next_pos[rows]

    def repeat(self, n: int):
        """Each row becomes n consecutive rows (K samples share one prefilled prompt)."""
        self.k = self.k.repeat_interleave(n, dim=1)
        self.v = self.v.repeat_interleave(n, dim=1)
        self.valid = self.valid.repeat_interleave(n, dim=0)
        self.next_pos = self.next_pos.repeat_interleave(n, dim=0)


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
             num_samples=1, seed=0, batch_size=16, progress=False, pack=None, drop_finished=None):
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
    drop_finished (default: in greedy decoding only) takes finished rows out of
    the batch; each remaining row is computed as before. Not when sampling: the
    rows draw from one random stream, and a row's samples would then depend on
    when the other rows stopped.
    """
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
    drop_finished = temperature <= 0 if drop_finished is None else drop_finished
    rows = per_batch * num_samples
    packing = packed_linears(model, rows) if pack else contextlib.nullcontext()
    head = PackedLinear(model.lm_head_weight, rows=rows) if pack else \
        (lambda h: F.linear(h, model.lm_head_weight))
    with packing:
        for s in tqdm(range(0, len(encoded), per_batch), desc="generate", disable=not progress, leave=False):
            out += _generate_batch(model, tokenizer, head, encoded[s:s + per_batch], max_new_tokens, temperature,
                                   top_p, top_k, num_samples, stop, generator, drop_finished)
    model.train(was_training)
    return out


def _generate_batch(model, tokenizer, head, chunk, max_new_tokens, temperature, top_p, top_k, num_samples,
                    stop, generator, drop_finished):
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
    h = model(ids, att, return_hidden=True, cache=cache)[:, -1]  # [P, H]
    logits = head(h)  # only the last position's logits are needed
    if num_samples > 1:
        cache.repeat(num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)
    B = P * num_samples
    new = torch.full((B, max_new_tokens), tokenizer.pad_id, dtype=torch.long, device=device)
    running = torch.arange(B, device=device)  # the batch row (of `new`) of each row still in the cache
    done = torch.zeros(B, dtype=torch.bool, device=device)  # per row in the cache
    n = 0
    for n in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_p, top_k, generator)
        tok = torch.where(done, tokenizer.pad_id, tok)
        new[running, n] = tok
        done |= torch.isin(tok, stop)
        finished = int(done.sum())  # read from the device once, for both checks below
        if finished == len(running) or n == max_new_tokens - 1:
            break
        if drop_finished and 4 * finished >= len(running):  # a quarter has finished: drop them
            going = (~done).nonzero()[:, 0]
            cache.keep(going)
            running, tok, done = running[going], tok[going], done[going]
        step_mask = (~done).long()[:, None]  # finished rows feed padding that nothing attends to
        logits = head(model(tok[:, None], step_mask, return_hidden=True, cache=cache)[:, -1])
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


def main(argv=None):
    ap = argparse.ArgumentParser(description="Load a checkpoint and answer prompts.")
    ap.add_argument("prompts", nargs="*", default=["What is the capital of France?"])
    ap.add_argument("--ckpt", default=model_lib.DEFAULT_CKPT)
    ap.add_argument("--max-new-tokens", type=int, default=120)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model = model_lib.load_model(args.ckpt)
    tok = data.load_tokenizer(args.ckpt)
    res = generate(model, tok, args.prompts, args.max_new_tokens, args.temperature, args.top_p, seed=args.seed)
    for p, r in zip(args.prompts, res):
        print(f"### {p}\n{r[0]['text']}\n")


if __name__ == "__main__":
    sys.exit(main())
