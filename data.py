"""Tokenizers, prompt templates, and the data that training and evaluation read.

    python data.py show --ckpt smollm2 --data demo_data/prefs_train.jsonl --n 3

One tokenizer interface over two kinds of files:
  * sentencepiece `tokenizer.model` (LLaMA 1/2, TinyLlama, Mistral);
  * byte-level BPE `tokenizer.json` (SmolLM2, Llama 3, Qwen) via the
    `tokenizers` package (a well-kept Rust implementation of the same merges the
    model was trained with; writing BPE by hand would be slower and riskier).

The prompt format (the checkpoint's own Jinja chat template, or a built-in)
and how a prompt and its answer become ids are documented once, in the
"Prompt templates" section below. Generation stops at any of
`Tokenizer.stop_ids` (EOS, generation_config's eos ids, the template's end of
turn).
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
    special: dict = field(default_factory=dict)  # special-token text -> id
    stop_ids: set = field(default_factory=set)
    path: str = ""
    # The prompt format (see "Prompt templates" below), set by load_tokenizer.
    template: str = "alpaca"  # "chat" (the checkpoint's Jinja template, or a .jinja file's), "alpaca" or "raw"
    template_source: str = ""  # where it came from: a file, or "built-in"
    chat_template: object = None  # the compiled Jinja template when template == "chat"
    system: str | None = None  # --system: the system message (None: the template's own default)
    content_parts: bool = False  # the template reads message content as [{"type": "text", "text": ...}]
    end_of_turn_id: int = -1  # the token that closes an answer (<|im_end|>, <|eot_id|>, </s>, ...)
    token_text_map: dict = field(default_factory=dict)  # bos_token/eos_token/... text, as templates see them

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


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_tokenizer(ckpt=None, template=None, system=None) -> Tokenizer:
    """The checkpoint's tokenizer and prompt format: tokenizer.json if present,
    else tokenizer.model. BOS/EOS/pad come from tokenizer_config.json /
    special_tokens_map.json / generation_config.json / config.json, in that
    order of preference. `template` and `system`: see set_template."""
    import model as model_lib

    path = model_lib.resolve_ckpt(ckpt) if (ckpt is None or not str(ckpt).endswith(".model")) else None
    if path is None:  # a bare sentencepiece file (used by tests)
        return _sentencepiece(Path(ckpt), None, {}, {}, {}, template, system)
    tok_cfg = read_json(path / "tokenizer_config.json")
    tok_cfg = {**read_json(path / "special_tokens_map.json"), **tok_cfg}
    gen_cfg = read_json(path / "generation_config.json")
    cfg = read_json(path / "config.json")
    if (path / "tokenizer.json").is_file():
        tok = _bpe(path / "tokenizer.json", tok_cfg, gen_cfg, cfg, template, system)
    elif (path / "tokenizer.model").is_file():
        tok = _sentencepiece(path / "tokenizer.model", path, tok_cfg, gen_cfg, cfg, template, system)
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


def _finish(tok: Tokenizer, folder, tok_cfg, gen_cfg, cfg, template, system):
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        s = _token_str(tok_cfg.get(key))
        if s is not None:
            tok.token_text_map[key] = s
    tok.token_text_map.setdefault("eos_token", tok.token_text(tok.eos_id))
    if tok.bos_id is not None:
        tok.token_text_map.setdefault("bos_token", tok.token_text(tok.bos_id))
    set_template(tok, template, folder, tok_cfg, system)
    stops = {tok.eos_id}
    for extra in (gen_cfg.get("eos_token_id"), cfg.get("eos_token_id")):
        stops |= set(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    tok.stop_ids = stops | {tok.end_of_turn_id}
    return tok


def _bpe(file: Path, tok_cfg, gen_cfg, cfg, template, system) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        impl = HFTokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers package raises a bare Exception for a torn or foreign file
        raise ValueError(f"{file}: not a readable tokenizer.json ({e}); the download may be truncated") from None
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
                    impl.get_vocab_size(with_added_tokens=True), special=special, path=str(file))
    return _finish(tok, file.parent, tok_cfg, gen_cfg, cfg, template, system)


def _sentencepiece(file: Path, folder, tok_cfg, gen_cfg, cfg, template, system) -> Tokenizer:
    import sentencepiece as spm

    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(file))
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{file}: not a readable sentencepiece model ({e})") from None
    bos, eos, pad = sp.bos_id(), sp.eos_id(), sp.pad_id()
    special = {sp.id_to_piece(i): i for i in (bos, eos) if i >= 0}
    tok = Tokenizer("sentencepiece", sp, bos if bos >= 0 else None, eos, pad if pad >= 0 else eos,
                    tok_cfg.get("add_bos_token", True), sp.get_piece_size(), special=special, path=str(file))
    return _finish(tok, folder, tok_cfg, gen_cfg, cfg, template, system)


# ----------------------------------------------------------------------------
# Prompt templates.
#
# A checkpoint that ships a chat template (tokenizer_config.json "chat_template",
# or the separate chat_template.jinja / chat_template.json) is prompted with that
# Jinja template, rendered as transformers' apply_chat_template renders it:
# conversation = optional system message, then the user turn. Checkpoints without
# one get a built-in: "alpaca" (the paper's Alpaca-tuned LLaMA; the default) or
# "raw" (the instruction alone). --template NAME overrides: chat, alpaca, raw, or
# a .jinja file (e.g. for a checkpoint that was trained on a template it does not
# ship). --system TEXT sets the system message (default: the template's own).
#
# Prompt and answer, the one place this is said:
#   prompt text = render(conversation, add_generation_prompt=True)
#   full text   = render(conversation + assistant answer, add_generation_prompt=False)
# The full text starts with the prompt text; what follows is the answer's head
# (e.g. Llama 2's " " before it), the answer, and its closing up to and including
# the first special token (the end of turn: <|eot_id|>, <|im_end|>, Llama 2's
# " </s>"; if the template writes none, EOS). Prompt ids = encode(prompt text),
# exactly what generation feeds the model. Answer ids = encode(prompt text +
# head + answer + closing) minus the prompt ids, so a sentencepiece "▁" or a BPE
# merge comes out as the model would generate it after those prompt ids; where a
# merge would cross the boundary (the prompt ids are not a prefix), the answer
# part is encoded on its own. A template that writes BOS gets no second one; BOS
# is prepended only for the built-ins, when the tokenizer says add_bos_token.

ALPACA_HEAD = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_HEAD_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.")
BUILT_IN = ("alpaca", "raw")
TEMPLATE_HELP = ("prompt format: chat (the checkpoint's own chat template; the default when it has one), alpaca, "
                 "raw, or a .jinja file")
SYSTEM_HELP = "system message for every prompt (default: the chat template's own, if any)"


def read_chat_template(folder, tok_cfg) -> tuple[str, str] | None:
    """(Jinja text, the file it came from) of a checkpoint folder, or None.
    chat_template.jinja wins over chat_template.json over tokenizer_config.json,
    as in transformers; of several named templates the one named "default"."""
    if folder is None:
        return None
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8"), str(folder / "chat_template.jinja")
    for file, cfg in ((folder / "chat_template.json", None), (folder / "tokenizer_config.json", tok_cfg)):
        chat = (read_json(file) if cfg is None else cfg).get("chat_template")
        if isinstance(chat, list):
            named = {t.get("name"): t.get("template") for t in chat if isinstance(t, dict)}
            chat = named.get("default") or next(iter(named.values()), None)
        if chat:
            if not isinstance(chat, str):
                raise ValueError(f"{file}: chat_template must be a string or a list of {{name, template}}")
            return chat, str(file)
    return None


def _jinja_env():
    """A sandboxed Jinja environment set up as transformers sets it up for chat templates."""
    import datetime

    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """{% generation %}...{% endgeneration %} marks the assistant's text for
        trainers that mask by it; here it renders its body unchanged."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


def compile_chat_template(text: str, source: str):
    import jinja2

    try:
        return _jinja_env().from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{source}: the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


def render_chat(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The checkpoint's chat template applied to [{"role", "content"}] (content a string)."""
    import jinja2

    if tok.content_parts:
        messages = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    try:
        return tok.chat_template.render(messages=messages, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt, **tok.token_text_map)
    except jinja2.TemplateError as e:
        raise ValueError(f"{tok.template_source}: the chat template refused this conversation "
                         f"(roles {[m['role'] for m in messages]}): {e}") from None


def set_template(tok: Tokenizer, name, folder, tok_cfg, system=None):
    """Choose the prompt format: None -> the checkpoint's chat template if it has
    one, else alpaca; "chat", "alpaca", "raw", or a path to a .jinja file."""
    shipped = read_chat_template(folder, tok_cfg)
    if name is None:
        name = "chat" if shipped else "alpaca"
    tok.system = system
    if name in BUILT_IN:
        tok.template, tok.template_source, tok.chat_template = name, "built-in", None
    elif name == "chat" or name.endswith(".jinja") or Path(name).is_file():
        if name == "chat":
            if not shipped:
                raise ValueError(f"--template chat: {folder or tok.path} ships no chat template "
                                 f"(tokenizer_config.json, chat_template.jinja); choose {' or '.join(BUILT_IN)}, "
                                 "or a .jinja file")
            text, source = shipped
        else:
            if not Path(name).is_file():
                raise FileNotFoundError(f"--template {name}: no such file")
            text, source = Path(name).read_text(encoding="utf-8"), name
        tok.template, tok.template_source = "chat", source
        tok.chat_template = compile_chat_template(text, source)
        # Templates that read content as a list of typed parts (Llama Guard 3's)
        # render nothing of a plain string: try the string, then the parts.
        probe = [{"role": "user", "content": "Probe question"}]
        tok.content_parts = False
        if "Probe question" not in render_chat(tok, probe, True):
            tok.content_parts = True
            if "Probe question" not in render_chat(tok, probe, True):
                raise ValueError(f"{source}: the chat template does not write the user's message")
    else:
        raise ValueError(f"unknown template '{name}'; choose chat, {', '.join(BUILT_IN)}, or a .jinja file")
    tok.end_of_turn_id = tok.eos_id  # the built-ins' closing; a chat template's is read off a probe answer
    try:
        tok.end_of_turn_id = (tok.encode(_split(tok, "Probe question", "Probe answer")[2]) or [tok.eos_id])[-1]
    except ValueError:  # a template that cannot take an answer (Llama Guard's): encode_response says so
        pass


def template_info(tok: Tokenizer) -> dict:
    """What train_config.json and results.json record about the prompt format."""
    return {"template": tok.template, "source": tok.template_source, "system": tok.system}


def describe_template(tok: Tokenizer) -> str:
    """One line for scripts to print."""
    what = f"chat template of {tok.template_source}" if tok.template == "chat" else f"built-in '{tok.template}'"
    system = f"; system message: {tok.system!r}" if tok.system is not None else ""
    return f"prompt template: {what}{system}"


def _user_text(instruction, input=""):
    return f"{instruction}\n\n{input}" if input else instruction


def _conversation(tok, instruction, input=""):
    return ([{"role": "system", "content": tok.system}] if tok.system is not None else []) + \
        [{"role": "user", "content": _user_text(instruction, input)}]


def render_prompt(tok: Tokenizer, instruction: str, input: str = "") -> str:
    """The prompt text, ending exactly where the model's answer begins."""
    if tok.template == "chat":
        return render_chat(tok, _conversation(tok, instruction, input), True)
    if tok.template == "alpaca":
        if input:
            head = ALPACA_HEAD_INPUT if tok.system is None else tok.system
            return f"{head}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        head = ALPACA_HEAD if tok.system is None else tok.system
        return f"{head}\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    user = _user_text(instruction, input)
    return user if tok.system is None else f"{tok.system}\n\n{user}"


def _split(tok, instruction, answer, input=""):
    """(prompt text, head + answer text, closing text) for one answer."""
    prompt = render_prompt(tok, instruction, input)
    if tok.template != "chat":
        return prompt, answer, tok.token_text_map["eos_token"]
    full = render_chat(tok, _conversation(tok, instruction, input) + [{"role": "assistant", "content": answer}],
                       False)
    if not full.startswith(prompt):
        raise ValueError(f"{tok.template_source}: the chat template's render of a conversation with the answer "
                         "does not start with its render of the prompt, so the two cannot be split")
    at = full.find(answer, len(prompt))
    if at < 0:
        raise ValueError(f"{tok.template_source}: the chat template changes the answer's text (it is not in the "
                         "render), so its tokens cannot be found")
    tail = full[at + len(answer):]
    m = tok._special_re.search(tail) if tok.special else None
    closing = tail[:m.end()] if m else tok.token_text_map["eos_token"]
    return prompt, full[len(prompt):at + len(answer)], closing


def encode_prompt(tok: Tokenizer, prompt: str, input: str = "") -> list[int]:
    """Rendered prompt -> ids (see "Prompt and answer" above)."""
    ids = tok.encode(render_prompt(tok, prompt, input))
    if tok.template != "chat" and tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
        ids = [tok.bos_id] + ids
    return ids


def encode_response(tok: Tokenizer, prompt: str, response: str, input: str = "", closed: bool = True) -> list[int]:
    """The answer's ids after encode_prompt(prompt), closed by the template's end
    of turn (not with closed=False: the text is an answer's opening, which goes
    on). The answer is stripped of surrounding whitespace first."""
    text, part, closing = _split(tok, prompt, response.strip(), input)
    if closed:
        part += closing
    if tok.template == "raw":  # nothing separates prompt and answer: encode the answer alone
        return tok.encode(part)
    p, whole = tok.encode(text), tok.encode(text + part)
    return whole[len(p):] if whole[:len(p)] == p else tok.encode(part)


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
    must have them) and its "prefix" when it has one: text the answer has
    already begun with, which both answers continue (tokenize_pairs). Filtered
    and empty pairs are counted in `stats`, never silently lost."""
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
        if isinstance(rec, dict) and "prefix" in rec:  # the answer's shared beginning (tokenize_pairs)
            pair["prefix"] = _field(where, rec, "prefix").strip()
            if not pair["prefix"]:
                raise ValueError(f"{where}: field 'prefix' is empty; leave it out for answers that start afresh")
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
# (ids concatenated, so the boundary is the one generation sees; see "Prompt
# templates"). Only response tokens are trained: the loss mask is False on the
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


def tokenize_sft(tok, examples, max_len):
    """[{prompt, input, response}] -> ([{"input_ids", "n_prompt", "index"}], stats).
    `index` is the example's position in `examples`."""
    out, stats = [], {"examples": len(examples), "truncated_prompt": 0, "dropped_too_long": 0}
    for i, ex in enumerate(examples):
        p = encode_prompt(tok, ex["prompt"], ex.get("input", ""))
        r = encode_response(tok, ex["prompt"], ex["response"], ex.get("input", ""))
        fit = _fit_prompt(tok, p, len(r), max_len)
        if fit is None:
            stats["dropped_too_long"] += 1
            continue
        stats["truncated_prompt"] += len(fit) < len(p)
        out.append({"input_ids": fit + r, "n_prompt": len(fit), "index": i})
    stats["kept"] = len(out)
    return out, stats


def tokenize_pairs(tok, pairs, max_len, opening_words=0):
    """[{prompt, chosen, rejected}] -> ([{"prompt_ids", "chosen_ids", "rejected_ids",
    "index"}], stats). Both answers share one (possibly truncated) prompt.

    opening_words > 0: each answer is cut to its first that many words and left
    open (no end-of-turn token), so training sees only how answers begin (for a
    safety pair: decline or help). Pairs whose openings are equal are dropped.
    An int for every pair, or a list with one per pair (0: that pair's whole answers).

    A pair with a "prefix" (an answer already under way: "Preheat the oven.")
    puts the prefix's tokens after the prompt, untrained, and its two answers
    continue it; opening_words then counts the continuation's words. The
    prefix must end where a token ends (after a sentence or a comma it does)."""
    words = opening_words if isinstance(opening_words, list) else [opening_words] * len(pairs)
    out, stats = [], {"pairs": len(pairs), "truncated_prompt": 0, "dropped_too_long": 0}
    if any(words):
        stats["dropped_same_opening"] = 0

    def answer(i, pair, text, n, head):
        text = " ".join(text.split()[:n]) if n else text.strip()
        full = encode_response(tok, pair["prompt"], f"{pair['prefix']} {text}" if head else text,
                               pair.get("input", ""), closed=not n)
        if full[:len(head)] != head:
            raise ValueError(f"pair {i}: its prefix does not end where a token ends once the answer follows it "
                             f"({pair['prefix'][-30:]!r}); end the prefix after a sentence or a comma")
        return full[len(head):]

    for i, (pair, n) in enumerate(zip(pairs, words)):
        p = encode_prompt(tok, pair["prompt"], pair.get("input", ""))
        head = encode_response(tok, pair["prompt"], pair["prefix"], pair.get("input", ""), closed=False) \
            if pair.get("prefix") else []
        c, r = answer(i, pair, pair["chosen"], n, head), answer(i, pair, pair["rejected"], n, head)
        p = p + head  # the prefix runs with the prompt, in the shared trunk
        if n and c == r:
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
    ap.add_argument("--template", default=None, help=TEMPLATE_HELP)
    ap.add_argument("--system", default=None, help=SYSTEM_HELP)
    ap.add_argument("--no-color", action="store_true", help="mark trained tokens as [tok] instead of colour")
    args = ap.parse_args(argv)
    tok = load_tokenizer(args.ckpt, args.template, args.system)
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
    print(describe_template(tok))
    print(f"{args.data}: load={stats} tokenize={tstats}")
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
    import common  # one-line errors, as every script

    common.cli(lambda: show(sys.argv[2:]))
