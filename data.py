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
    m = re.search(r"<\|im_start\|>system\\n(.*?)<\|im_end\|>", chat)
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


def encode_response(tok: Tokenizer, response: str, template: str | None = None) -> list[int]:
    """Answer text -> ids, closed by the template's end-of-turn token."""
    end = TEMPLATES[template or tok.template]["end"]
    # sentencepiece adds its dummy-prefix space itself, which is the "▁" that
    # follows "[INST] ... [/INST]" or "### Response:" when the model generates.
    return tok.encode(response.strip()) + [tok.special[end] if end in tok.special else tok.eos_id]
