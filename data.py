"""Tokenizers, prompt templates, and the data that training and evaluation read.

    python data.py show --ckpt smollm2 --data demo_data/prefs_train.jsonl --n 3

One tokenizer interface over two kinds of files:
  * sentencepiece `tokenizer.model` (LLaMA 1/2, TinyLlama, Mistral);
  * byte-level BPE `tokenizer.json` (SmolLM2, Llama 3, Qwen) via the
    `tokenizers` package (a well-kept Rust implementation of the same merges the
    model was trained with; writing BPE by hand would be slower and riskier).

Conventions, documented once here:
  * BOS: a rendered prompt starts with BOS exactly once. Templates that begin with
    their own start token (ChatML's <|im_start|>, Llama 3's <|begin_of_text|>)
    carry it in the text; otherwise BOS is prepended when the tokenizer's
    config says add_bos_token (sentencepiece LLaMA: yes; SmolLM2: no).
  * End of answer: every response ends with the template's end-of-turn token
    (<|im_end|> for ChatML, <|eot_id|> for Llama 3, EOS otherwise). Generation
    stops at any of `Tokenizer.stop_ids`.
  * Prompt/response boundary: the prompt and the response are encoded
    separately and their ids concatenated, so no BPE merge can straddle the
    boundary and the prompt ids are exactly those the model sees when it
    generates (model.generate encodes the same rendered prompt).
"""
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

# ----------------------------------------------------------------------------
# Tokenizers


@dataclass
class Tokenizer:
    """encode/decode plus the ids the rest of the code needs.

    pad_id may equal eos_id (SmolLM2, Llama): padding is always tracked by an
    attention mask and a loss mask, never recognised by its id.
    """
    kind: str  # "sentencepiece" or "bpe"
    impl: object
    bos_id: int | None
    eos_id: int
    pad_id: int
    add_bos: bool
    vocab_size: int
    template: str  # default prompt template for this checkpoint (see TEMPLATES)
    system_prompt: str | None = None  # ChatML default system message, from the chat template
    special: dict = field(default_factory=dict)  # special-token text -> id
    stop_ids: set = field(default_factory=set)
    path: str = ""

    def encode(self, text: str) -> list[int]:
        """Text -> ids, adding no BOS/EOS. Special-token text such as
        "<|im_start|>" or "<s>" becomes its single id."""
        if self.kind == "bpe":
            return self.impl.encode(text, add_special_tokens=False).ids
        ids = []
        for part in self._special_re.split(text) if self.special else [text]:
            if part in self.special:
                ids.append(self.special[part])
            elif part:
                ids.extend(self.impl.encode(part))
        return ids

    def decode(self, ids, skip_special=True) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "bpe":
            return self.impl.decode(ids, skip_special_tokens=skip_special)
        if skip_special:
            ids = [i for i in ids if i not in self.special.values()]
        return self.impl.decode(ids)

    def token_text(self, i: int) -> str:
        """The raw piece of one id, for displays (see `show`)."""
        return self.impl.id_to_token(i) if self.kind == "bpe" else self.impl.id_to_piece(i)

    @property
    def _special_re(self):
        return re.compile("(" + "|".join(re.escape(s) for s in sorted(self.special, key=len, reverse=True)) + ")")


def _token_str(v):
    """tokenizer_config.json writes special tokens as "text" or {"content": "text", ...}."""
    return v.get("content") if isinstance(v, dict) else v


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_tokenizer(ckpt=None, template=None) -> Tokenizer:
    """The checkpoint's tokenizer: tokenizer.json if present, else tokenizer.model.
    BOS/EOS/pad come from tokenizer_config.json / special_tokens_map.json /
    generation_config.json / config.json, in that order of preference."""
    import model as model_lib

    path = model_lib.resolve_ckpt(ckpt) if (ckpt is None or not str(ckpt).endswith(".model")) else None
    if path is None:  # a bare sentencepiece file (used by tests)
        return _sentencepiece(Path(ckpt), {}, {}, {}, template)
    tok_cfg = _read_json(path / "tokenizer_config.json")
    tok_cfg = {**_read_json(path / "special_tokens_map.json"), **tok_cfg}
    gen_cfg = _read_json(path / "generation_config.json")
    cfg = _read_json(path / "config.json")
    if (path / "tokenizer.json").is_file():
        tok = _bpe(path / "tokenizer.json", tok_cfg, gen_cfg, cfg, template)
    elif (path / "tokenizer.model").is_file():
        tok = _sentencepiece(path / "tokenizer.model", tok_cfg, gen_cfg, cfg, template)
    else:
        raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model")
    if cfg.get("vocab_size") and tok.vocab_size > cfg["vocab_size"]:
        raise ValueError(f"{tok.path} has {tok.vocab_size} tokens but {path / 'config.json'} vocab_size is "
                         f"{cfg['vocab_size']}: this tokenizer does not fit the model's embedding matrix")
    return tok


def _ids(*candidates):
    """First non-None id; config files may hold an int or a list of ints."""
    for c in candidates:
        if c is not None:
            return c
    return None


def _finish(tok: Tokenizer, tok_cfg, gen_cfg, cfg, template):
    chat = tok_cfg.get("chat_template") or ""
    if isinstance(chat, list):  # some configs hold several named templates
        chat = next((t["template"] for t in chat if t.get("name") == "default"), chat[0]["template"])
    tok.template = template or guess_template(chat, tok.kind)
    if tok.template not in TEMPLATES:
        raise ValueError(f"unknown template '{tok.template}'; choose one of {sorted(TEMPLATES)}")
    # The default system message a ChatML template inserts (SmolLM2: "You are a
    # helpful AI assistant named SmolLM, ..."); the template holds a real newline.
    m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", chat)
    tok.system_prompt = m.group(1) if m else None
    stops = {tok.eos_id}
    for extra in (gen_cfg.get("eos_token_id"), cfg.get("eos_token_id")):
        stops |= set(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    end = TEMPLATES[tok.template]["end"]
    if end and end in tok.special:
        stops.add(tok.special[end])
    tok.stop_ids = stops
    return tok


def guess_template(chat_template: str, kind: str) -> str:
    if "<|im_start|>" in chat_template:
        return "chatml"
    if "<|start_header_id|>" in chat_template:
        return "llama3"
    if "[INST]" in chat_template:
        return "llama2"
    return "alpaca"  # the paper's fine-tuned LLaMA models use the Alpaca prompt


def _bpe(file: Path, tok_cfg, gen_cfg, cfg, template) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    impl = HFTokenizer.from_file(str(file))
    special = {t.content: i for i, t in impl.get_added_tokens_decoder().items() if t.special}

    def tid(key, cfg_key):
        s = _token_str(tok_cfg.get(key))
        if s is not None:
            i = impl.token_to_id(s)
            if i is None:
                raise ValueError(f"{file.parent}/tokenizer_config.json: {key} '{s}' is not in {file}")
            return i
        v = _ids(gen_cfg.get(cfg_key), cfg.get(cfg_key))
        return v[0] if isinstance(v, list) else v

    bos, eos = tid("bos_token", "bos_token_id"), tid("eos_token", "eos_token_id")
    if eos is None:
        raise ValueError(f"{file.parent}: no eos_token in tokenizer_config.json nor eos_token_id in config.json")
    pad = tid("pad_token", "pad_token_id")
    tok = Tokenizer("bpe", impl, bos, eos, eos if pad is None else pad, bool(tok_cfg.get("add_bos_token", False)),
                    impl.get_vocab_size(with_added_tokens=True), "", special=special, path=str(file))
    return _finish(tok, tok_cfg, gen_cfg, cfg, template)


def _sentencepiece(file: Path, tok_cfg, gen_cfg, cfg, template) -> Tokenizer:
    import sentencepiece as spm

    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist")
    sp = spm.SentencePieceProcessor(model_file=str(file))
    bos, eos, pad = sp.bos_id(), sp.eos_id(), sp.pad_id()
    special = {sp.id_to_piece(i): i for i in (bos, eos) if i >= 0}
    tok = Tokenizer("sentencepiece", sp, bos if bos >= 0 else None, eos, pad if pad >= 0 else eos,
                    tok_cfg.get("add_bos_token", True), sp.get_piece_size(), "", special=special, path=str(file))
    return _finish(tok, tok_cfg, gen_cfg, cfg, template)


# ----------------------------------------------------------------------------
# Prompt templates: `prompt` is the text up to where the answer starts; `end`
# is the token that closes an answer (None: the tokenizer's EOS).

ALPACA_HEAD = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_HEAD_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.")

TEMPLATES = {
    "alpaca": {"end": None},
    "chatml": {"end": "<|im_end|>"},
    "llama2": {"end": None},
    "llama3": {"end": "<|eot_id|>"},
    "raw": {"end": None},
}


def render_prompt(tok: Tokenizer, instruction: str, input: str = "", template: str | None = None) -> str:
    """The prompt text, ending exactly where the model's answer begins."""
    template = template or tok.template
    user = f"{instruction}\n\n{input}" if input else instruction
    if template == "alpaca":
        if input:
            return f"{ALPACA_HEAD_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        return f"{ALPACA_HEAD}\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    if template == "chatml":
        system = f"<|im_start|>system\n{tok.system_prompt}<|im_end|>\n" if tok.system_prompt else ""
        return f"{system}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    if template == "llama2":
        return f"[INST] {user.strip()} [/INST]"
    if template == "llama3":
        return (f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
                f"<|start_header_id|>assistant<|end_header_id|>\n\n")
    if template == "raw":
        return user
    raise ValueError(f"unknown template '{template}'; choose one of {sorted(TEMPLATES)}")


def encode_prompt(tok: Tokenizer, prompt: str, template: str | None = None, input: str = "") -> list[int]:
    """Rendered prompt -> ids, with BOS exactly once (see the module docstring)."""
    ids = tok.encode(render_prompt(tok, prompt, input, template))
    if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
        ids = [tok.bos_id] + ids
    return ids


def encode_response(tok: Tokenizer, response: str, template: str | None = None,
                    closed: bool = True) -> list[int]:
    """Answer text -> ids, closed by the template's end-of-turn token (not
    with closed=False: the text is an answer's opening, which goes on)."""
    end = TEMPLATES[template or tok.template]["end"]
    # sentencepiece adds its dummy-prefix space itself, which is the "▁" that
    # follows "[INST] ... [/INST]" or "### Response:" when the model generates.
    ids = tok.encode(response.strip())
    if closed:
        ids.append(tok.special[end] if end in tok.special else tok.eos_id)
    return ids


# ----------------------------------------------------------------------------
# Reading records: every error names the file and, for JSONL, the line.

def read_records(path) -> list[tuple[str, dict]]:
    """A JSON list (or one JSON object) or a JSONL file -> [(where, record)],
    `where` being "file:line" or "file[index]" for error messages."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    if path.suffix != ".jsonl" and text.lstrip()[:1] in "[{":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data" after the first object: JSON Lines, read below
                raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        else:
            rows = obj if isinstance(obj, list) else [obj]
            return [(f"{path}[{i}]", r) for i, r in enumerate(rows)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: malformed JSON line ({e.msg}); fix or remove that line") from None
    return out


def _field(where: str, rec: dict, key: str, required=True):
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if key not in rec:
        if required:
            raise KeyError(f"{where}: missing field '{key}' (fields present: {sorted(rec)})")
        return ""
    v = rec[key]
    if not isinstance(v, str):
        raise ValueError(f"{where}: field '{key}' should be a string, got {type(v).__name__}")
    return v


# ----------------------------------------------------------------------------
# Instruction data (SFT / SIT)

def load_instructions(path, stats=None) -> list[dict]:
    """Alpaca JSON list {instruction, input?, output} or JSONL {prompt, response}
    -> [{"prompt", "input", "response"}]. A record with an empty response is
    skipped and counted in stats["skipped_empty"]."""
    stats = {} if stats is None else stats
    out = []
    for where, rec in read_records(path):
        if isinstance(rec, dict) and "instruction" in rec:
            ex = {"prompt": _field(where, rec, "instruction"), "input": _field(where, rec, "input", False),
                  "response": _field(where, rec, "output")}
        else:
            ex = {"prompt": _field(where, rec, "prompt"), "input": _field(where, rec, "input", False),
                  "response": _field(where, rec, "response")}
        if not ex["prompt"].strip():
            raise ValueError(f"{where}: empty instruction/prompt")
        if not ex["response"].strip():
            stats["skipped_empty"] = stats.get("skipped_empty", 0) + 1
            continue
        out.append(ex)
    if not out:
        raise ValueError(f"{path}: no usable instruction examples")
    return out


def mix_sit(instructions: list[dict], safety: list[dict], n_safety: int, seed: int = 0) -> list[dict]:
    """The paper's SIT set: the instruction data plus n_safety safety
    demonstrations (harmful request -> safe answer) drawn without replacement
    by a seeded RNG, so the same seed gives the same mix."""
    import random

    if n_safety > len(safety):
        raise ValueError(f"--n-safety {n_safety} is more than the {len(safety)} safety demonstrations available")
    return instructions + random.Random(seed).sample(safety, n_safety)


# ----------------------------------------------------------------------------
# Preference data (DPO, reward models)

def _pku_pair(where, rec, stats):
    """PKU-SafeRLHF raw row -> pair, with the paper's filter: the chosen answer
    is both the better and a safe one, the rejected one is unsafe."""
    try:
        better, safer = int(rec["better_response_id"]), int(rec["safer_response_id"])
        safe = [bool(rec["is_response_0_safe"]), bool(rec["is_response_1_safe"])]
    except KeyError as e:
        raise KeyError(f"{where}: PKU-SafeRLHF row without field {e}") from None
    if better not in (0, 1) or safer not in (0, 1):
        raise ValueError(f"{where}: better_response_id/safer_response_id must be 0 or 1")
    if not (better == safer and safe[better] and not safe[1 - better]):
        stats["dropped_pku_filter"] = stats.get("dropped_pku_filter", 0) + 1
        return None
    return {"prompt": _field(where, rec, "prompt"), "chosen": _field(where, rec, f"response_{better}"),
            "rejected": _field(where, rec, f"response_{1 - better}")}


ASSISTANT = "\n\nAssistant:"


def _hh_pair(where, rec, stats):
    """Anthropic HH-RLHF: two whole dialogues sharing a prefix; the prompt is
    everything up to the last "\\n\\nAssistant:", the answers what follows it."""
    chosen, rejected = _field(where, rec, "chosen"), _field(where, rec, "rejected")
    cut_c, cut_r = chosen.rfind(ASSISTANT), rejected.rfind(ASSISTANT)
    if cut_c < 0 or cut_r < 0:
        raise ValueError(f"{where}: HH-RLHF dialogue without '\\n\\nAssistant:'")
    prompt = chosen[:cut_c]
    if rejected[:cut_r] != prompt:
        stats["dropped_hh_prefix"] = stats.get("dropped_hh_prefix", 0) + 1
        return None
    prompt = prompt.strip()
    if prompt.startswith("Human:") and "\n\nHuman:" not in prompt:
        prompt = prompt[len("Human:"):].strip()  # single turn: the plain question
    return {"prompt": prompt, "chosen": chosen[cut_c + len(ASSISTANT):], "rejected": rejected[cut_r + len(ASSISTANT):]}


def load_preferences(path, stats=None, keep=()) -> list[dict]:
    """JSONL/JSON of {prompt, chosen, rejected}, PKU-SafeRLHF raw rows or
    HH-RLHF dialogues (recognised per record) -> [{"prompt", "chosen", "rejected"}],
    plus the record's string fields named in `keep` (e.g. "kind"; each record
    must have them). Filtered and empty pairs are counted in `stats`, never
    silently lost."""
    stats = {} if stats is None else stats
    out = []
    for where, rec in read_records(path):
        if isinstance(rec, dict) and "response_0" in rec:
            pair = _pku_pair(where, rec, stats)
        elif isinstance(rec, dict) and "prompt" not in rec and "chosen" in rec:
            pair = _hh_pair(where, rec, stats)
        else:
            pair = {k: _field(where, rec, k) for k in ("prompt", "chosen", "rejected")}
        if pair is None:
            continue
        pair.update({k: _field(where, rec, k) for k in keep})
        if not pair["chosen"].strip() or not pair["rejected"].strip():
            stats["skipped_empty"] = stats.get("skipped_empty", 0) + 1
            continue
        if pair["chosen"].strip() == pair["rejected"].strip():
            stats["skipped_identical"] = stats.get("skipped_identical", 0) + 1
            continue
        out.append(pair)
    stats["pairs"] = len(out)
    if not out:
        raise ValueError(f"{path}: no usable preference pairs (counts: {stats})")
    return out


def load_prompts(path) -> list[str]:
    """Prompts for generation (RAFT, evaluation), from: safety-tuned-llamas
    evaluation JSON {"instructions": [...], "inputs": [...]}, JSONL with a
    `prompt` or `instruction` field, an Alpaca JSON list, or plain text with
    one prompt per line (.txt)."""
    path = Path(path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise FileNotFoundError(f"prompt file '{path}' does not exist")
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = read_records(path)
    if len(records) == 1 and isinstance(records[0][1], dict) and "instructions" in records[0][1]:
        rec = records[0][1]
        instructions, inputs = rec["instructions"], rec.get("inputs") or []
        for name, values in (("instructions", instructions), ("inputs", inputs)):
            if not isinstance(values, list):
                raise ValueError(f"{path}: '{name}' should be a list of strings, got {type(values).__name__}")
            bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
            if bad is not None:
                raise ValueError(f"{path}: {name}[{bad}] should be a string, got {type(values[bad]).__name__}")
        empty = next((i for i, q in enumerate(instructions) if not q.strip()), None)
        if empty is not None:
            raise ValueError(f"{path}: instructions[{empty}] is empty")
        if inputs and len(inputs) != len(instructions):
            raise ValueError(f"{path}: {len(instructions)} instructions but {len(inputs)} inputs")
        return [f"{q}\n\n{x}" if x else q for q, x in zip(instructions, inputs or [""] * len(instructions))]
    out = []
    for where, rec in records:
        key = "prompt" if isinstance(rec, dict) and "prompt" in rec else "instruction"
        q, x = _field(where, rec, key), _field(where, rec, "input", False)
        if not q.strip():
            raise ValueError(f"{where}: field '{key}' is empty")
        out.append(f"{q}\n\n{x}" if x else q)
    return out


# ----------------------------------------------------------------------------
# Tokenisation. Each sequence is encode_prompt(prompt) + encode_response(answer)
# (ids concatenated, so the boundary is the one generation sees; see the module
# docstring). Only response tokens are trained: the loss mask is False on the
# prompt and on padding, and True on the closing end-of-turn/EOS token even
# when the pad id has the same value (padding is never recognised by its id).
#
# Truncation keeps the answers whole: the prompt is cut from the left (after
# its BOS, which stays) until prompt + longest answer <= max_len; if fewer
# than MIN_PROMPT prompt tokens would remain (or the whole prompt, if shorter),
# the example is dropped and counted in stats["dropped_too_long"].

MIN_PROMPT = 8


def _fit_prompt(tok, prompt_ids, answer_len, max_len):
    room = max_len - answer_len
    if len(prompt_ids) <= room:
        return prompt_ids
    if room < min(MIN_PROMPT, len(prompt_ids)):
        return None
    keep_bos = tok.add_bos and tok.bos_id is not None and prompt_ids[0] == tok.bos_id
    return [prompt_ids[0]] + prompt_ids[len(prompt_ids) - room + 1:] if keep_bos else prompt_ids[-room:]


def tokenize_sft(tok, examples, max_len, template=None):
    """[{prompt, input, response}] -> ([{"input_ids", "n_prompt", "index"}], stats).
    `index` is the example's position in `examples`."""
    out, stats = [], {"examples": len(examples), "truncated_prompt": 0, "dropped_too_long": 0}
    for i, ex in enumerate(examples):
        p = encode_prompt(tok, ex["prompt"], template, ex.get("input", ""))
        r = encode_response(tok, ex["response"], template)
        fit = _fit_prompt(tok, p, len(r), max_len)
        if fit is None:
            stats["dropped_too_long"] += 1
            continue
        stats["truncated_prompt"] += len(fit) < len(p)
        out.append({"input_ids": fit + r, "n_prompt": len(fit), "index": i})
    stats["kept"] = len(out)
    return out, stats


def tokenize_pairs(tok, pairs, max_len, template=None, opening_words=0):
    """[{prompt, chosen, rejected}] -> ([{"prompt_ids", "chosen_ids", "rejected_ids",
    "index"}], stats). Both answers share one (possibly truncated) prompt.

    opening_words > 0: each answer is cut to its first that many words and left
    open (no end-of-turn token), so training sees only how answers begin (for a
    safety pair: decline or help). Pairs whose openings are equal are dropped."""
    out, stats = [], {"pairs": len(pairs), "truncated_prompt": 0, "dropped_too_long": 0}
    if opening_words:
        stats["dropped_same_opening"] = 0

    def answer(text):
        if not opening_words:
            return encode_response(tok, text, template)
        return encode_response(tok, " ".join(text.split()[:opening_words]), template, closed=False)

    for i, pair in enumerate(pairs):
        p = encode_prompt(tok, pair["prompt"], template, pair.get("input", ""))
        c, r = answer(pair["chosen"]), answer(pair["rejected"])
        if opening_words and c == r:
            stats["dropped_same_opening"] += 1
            continue
        fit = _fit_prompt(tok, p, max(len(c), len(r)), max_len)
        if fit is None:
            stats["dropped_too_long"] += 1
            continue
        stats["truncated_prompt"] += len(fit) < len(p)
        out.append({"prompt_ids": fit, "chosen_ids": c, "rejected_ids": r, "index": i})
    stats["kept"] = len(out)
    return out, stats


def example_length(ex) -> int:
    """Tokens an example puts in a batch row (a pair: prompt + both answers + 1, see collate_pairs)."""
    if "input_ids" in ex:
        return len(ex["input_ids"])
    return len(ex["prompt_ids"]) + len(ex["chosen_ids"]) + len(ex["rejected_ids"]) + 1


# ----------------------------------------------------------------------------
# Batches: right padding to the longest row of the batch (dynamic padding).

def right_pad(seqs, pad_id, device="cpu"):
    """Token lists -> input_ids [B, T] and attention_mask [B, T] (1 = token), padded on the right."""
    import torch

    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long, device=device)
    att = torch.zeros(len(seqs), T, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, device=device)
        att[i, :len(s)] = 1
    return ids, att


def _pad(seqs, n_prompts, pad_id):
    """Token lists -> input_ids [B, T], attention_mask [B, T], loss_mask [B, T] (bool, True on answer tokens)."""
    ids, att = right_pad(seqs, pad_id)
    mask = att.bool()
    for i, n in enumerate(n_prompts):
        mask[i, :n] = False  # the prompt is context, not a target
    return {"input_ids": ids, "attention_mask": att, "loss_mask": mask}


def collate_sft(examples, pad_id):
    """-> {"input_ids", "attention_mask", "loss_mask"} [B, T] and "index" [B].
    loss_mask[b, t] says whether token t is trained (predicted from t-1)."""
    import torch

    batch = _pad([e["input_ids"] for e in examples], [e["n_prompt"] for e in examples], pad_id)
    batch["index"] = torch.tensor([e["index"] for e in examples])
    return batch


def collate_pairs(examples, pad_id):
    """B pairs -> one batch of B rows, each pair in one row that runs its prompt once:

        [ prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected ]
          segment 0     segment 1           segment 2

    Given `segments`, the model lets each branch see the shared part and itself
    only (model.positions_and_mask), so branch k computes exactly what
    prompt + answer k would alone. The prompt's last token starts each branch
    because it predicts the answer's first token. loss_mask marks both answers;
    chosen_mask / rejected_mask [B, T-1] pick each answer's shifted log-probs
    (as losses.response_token_logps returns them).
    """
    import torch

    ids, segs, trained = [], [], []
    for e in examples:
        p, c, r = e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]
        if not p:
            raise ValueError(f"pair {e['index']}: empty prompt; a branch needs the prompt's last token")
        ids.append(p + c + p[-1:] + r)
        segs.append([0] * (len(p) - 1) + [1] * (1 + len(c)) + [2] * (1 + len(r)))
        trained.append([0] * len(p) + [1] * len(c) + [0] + [1] * len(r))
    input_ids, att = right_pad(ids, pad_id)
    segments, _ = right_pad(segs, -1)  # -1 at padding
    loss_mask = right_pad(trained, 0)[0].bool()
    return {"input_ids": input_ids, "attention_mask": att, "loss_mask": loss_mask, "segments": segments,
            "chosen_mask": loss_mask[:, 1:] & (segments[:, 1:] == 1),
            "rejected_mask": loss_mask[:, 1:] & (segments[:, 1:] == 2),
            "index": torch.tensor([e["index"] for e in examples])}


def length_grouped_batches(lengths, batch_size, seed, epoch, group=64):
    """Index batches for one epoch. The data is shuffled (seed, epoch), cut into
    mega-batches of `group` batches, each sorted by length and cut into batches,
    and the batch order is shuffled again: rows of similar length share a batch
    (less padding) while the order stays random. group=1: plain shuffled batches."""
    import random

    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * group
    batches = []
    for s in range(0, len(order), span):
        mega = sorted(order[s:s + span], key=lambda i: -lengths[i])
        batches += [mega[j:j + batch_size] for j in range(0, len(mega), batch_size)]
    rng.shuffle(batches)
    return batches


def padding_fraction(batches, lengths) -> float:
    """Share of padded slots when every batch is padded to its longest row."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1.0 - sum(lengths[i] for b in batches for i in b) / max(padded, 1)


# ----------------------------------------------------------------------------
# `python data.py show`: trained tokens in green [brackets], masked ones plain.

def render_masked(tok, ids, loss_mask, color=True) -> str:
    """One sequence as text: trained tokens marked, masked tokens plain, so a
    mask that covers the prompt or misses the final EOS is seen at a glance."""
    parts = []
    for i, m in zip(ids, loss_mask):
        piece = tok.decode([i], skip_special=False).replace("\n", "\\n\n") or f"<{i}>"
        if m:
            parts.append(f"\033[42;30m{piece}\033[0m" if color else f"[{piece}]")
        else:
            parts.append(f"\033[2m{piece}\033[0m" if color else piece)
    return "".join(parts)


def show(argv=None):
    import argparse

    ap = argparse.ArgumentParser(prog="data.py show", description="Print tokenised examples with the loss mask.")
    ap.add_argument("--ckpt", default=None, help="checkpoint folder for the tokenizer (default: smollm2)")
    ap.add_argument("--data", required=True, help="instruction (Alpaca/JSONL) or preference file")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--template", default=None)
    ap.add_argument("--no-color", action="store_true", help="mark trained tokens as [tok] instead of colour")
    args = ap.parse_args(argv)
    tok = load_tokenizer(args.ckpt, args.template)
    first = read_records(args.data)[0][1]
    prefs = isinstance(first, dict) and ("chosen" in first or "response_0" in first)
    stats = {}
    if prefs:
        examples, tstats = tokenize_pairs(tok, load_preferences(args.data, stats), args.max_len)
        batch = collate_pairs(examples[:args.n], tok.pad_id)
    else:
        examples, tstats = tokenize_sft(tok, load_instructions(args.data, stats), args.max_len)
        batch = collate_sft(examples[:args.n], tok.pad_id)
    color = sys.stdout.isatty() and not args.no_color
    print(f"{args.data}: template={tok.template} load={stats} tokenize={tstats}")
    print("legend: " + render_masked(tok, tok.encode("trained"), [1] * 8, color) + " = trained, "
          + render_masked(tok, tok.encode("masked"), [0] * 8, color) + " = masked\n")
    for row in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        ids, trained = batch["input_ids"][row, :n].tolist(), batch["loss_mask"][row, :n].tolist()
        print(f"--- {'pair' if prefs else 'example'} #{row}: {n} tokens, {sum(trained)} trained")
        if not prefs:
            print(render_masked(tok, ids, trained, color) + "\n")
            continue
        # one row per pair (collate_pairs): show the shared prompt, then each branch on its own line
        seg = batch["segments"][row, :n].tolist()
        for k, name in ((0, "prompt"), (1, "chosen branch"), (2, "rejected branch")):
            part = [i for i in range(n) if seg[i] == k]
            print(f"[{name}] " + render_masked(tok, [ids[i] for i in part], [trained[i] for i in part], color))
        print()


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "show":
        sys.exit("usage: python data.py show --ckpt DIR --data FILE [--n 3]")
    show(sys.argv[2:])
