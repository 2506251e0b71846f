"""Tokenizers built on the `tokenizers` library, chat templates through jinja2, UTF-8-safe streaming decode.

Sources: a `tokenizer.json`, a SentencePiece `tokenizer.model` (Llama 2), or the vocabulary inside a GGUF file
(`llama` = SentencePiece BPE with byte fallback, `gpt2` = byte-level BPE with llama.cpp's pre-tokenizer regexes).
"""
from __future__ import annotations

import functools
import json
import os
from datetime import datetime

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .errors import InferRecipesError, ModelSourceError

# llama.cpp's pre-tokenizer regexes by `tokenizer.ggml.pre`, applied in order before byte-level BPE.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_REGEXES = {
    "default": [_GPT2], "gpt-2": [_GPT2], "gpt2": [_GPT2],
    "llama-bpe": [_LLAMA3], "llama3": [_LLAMA3], "llama-v3": [_LLAMA3],
    "qwen2": [_QWEN2], "deepseek-r1-qwen": [_QWEN2],
    "smollm": [r"\p{N}", _GPT2], "starcoder": [r"\p{N}", _GPT2], "refact": [r"\p{N}", _GPT2],
}
_IGNORE_MERGES = ("llama-bpe", "llama3", "llama-v3")
_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED, _TOKEN_TYPE_UNKNOWN = 3, 4, 2
SPIECE_UNDERLINE = "\u2581"


def _spm_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges recovered from its vocabulary: any split of a piece into two pieces, ranked by
    the score of the merged piece (higher first), the way sentencepiece picks them."""
    ranked = []
    for piece, pid in vocab.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                ranked.append((-scores[pid], pid, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(r[4], r[5]) for r in ranked]


def build_spm_bpe(pieces: list[str], scores: list[float], types: list[int], add_prefix_space: bool) -> Tokenizer:
    """Llama-2-style SentencePiece BPE: '▁' for spaces, byte fallback, a leading space on the first segment."""
    vocab = {p: i for i, p in enumerate(pieces)}
    unk = next((pieces[i] for i, t in enumerate(types) if t == _TOKEN_TYPE_UNKNOWN), None)
    normal = {p: i for p, i in vocab.items() if types[i] in (1, 6)}  # normal and byte pieces take part in merges
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(normal, scores), unk_token=unk, fuse_unk=True,
                               byte_fallback=True))
    # llama.cpp prepends a space to every text fragment (the first, and each after a special token), always:
    # a normalizer does exactly that, since added tokens split the text before normalization
    prepend = [normalizers.Prepend(SPIECE_UNDERLINE)] if add_prefix_space else []
    tok.normalizer = normalizers.Sequence([*prepend, normalizers.Replace(" ", SPIECE_UNDERLINE)])
    strip = [decoders.Strip(content=" ", left=1, right=0)] if add_prefix_space else []
    tok.decoder = decoders.Sequence([decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(),
                                     decoders.Fuse(), *strip])
    _add_special(tok, pieces, types)
    return tok


def build_byte_bpe(tokens: list[str], merges: list[str], types: list[int], pre: str) -> Tokenizer:
    """GPT-2-style byte-level BPE with the pre-tokenizer llama.cpp uses for `pre`."""
    if pre not in PRE_TOKENIZER_REGEXES:
        raise ModelSourceError(f"unsupported GGUF pre-tokenizer {pre!r}: supported are "
                               f"{', '.join(sorted(PRE_TOKENIZER_REGEXES))}")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    # Llama 3 looks a whole pre-token up in the vocabulary before merging (llama.cpp and HF both do)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _IGNORE_MERGES))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_REGEXES[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    _add_special(tok, tokens, types)
    return tok


def _add_special(tok: Tokenizer, tokens: list[str], types: list[int]) -> None:
    specials = [AddedToken(tokens[i], special=t == _TOKEN_TYPE_CONTROL, normalized=False)
                for i, t in enumerate(types) if t in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)]
    tok.add_special_tokens([s for s in specials if s.special])
    tok.add_tokens([s for s in specials if not s.special])


def _with_bos(tok: Tokenizer, bos: str | None, add_bos: bool) -> None:
    if add_bos and bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])


class ChatTemplate:
    """A Hugging Face chat template rendered with a sandboxed jinja2 environment."""

    def __init__(self, source: str, bos_token: str | None, eos_token: str | None):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise InferRecipesError(f"chat template refused the conversation: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                      ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = source  # what a saved checkpoint writes back out
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token, eos_token=self.eos_token, **kwargs)


def validate_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise InferRecipesError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InferRecipesError(f"messages[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise InferRecipesError(f"messages[{i}].role {m['role']!r} is not one of system, user, assistant, tool")
    return messages


class LLMTokenizer:
    """Encode/decode, special ids and the chat template of one model."""

    def __init__(self, tokenizer: Tokenizer, bos_token: str | None, eos_token: str | None,
                 chat_template: str | None):
        self.tokenizer = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = tokenizer.token_to_id(eos_token) if eos_token else None
        self.chat_template = ChatTemplate(chat_template, bos_token, eos_token) if chat_template else None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # the batch call releases the GIL while it works (the single one holds it: a 3 MB prompt would stop every
        # other thread of a server for seconds), and is no slower for one text
        try:
            return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        except (TypeError, ValueError) as e:  # e.g. an unpaired surrogate, which is not Unicode text
            raise InferRecipesError(f"the text cannot be tokenized ({e}): it must be valid Unicode") from None

    @functools.cached_property
    def max_token_chars(self) -> int:
        """At most this many characters per token: a text longer than context x this cannot fit (checked before
        tokenizing a huge prompt)."""
        return max(len(t) for t in self.tokenizer.get_vocab(with_added_tokens=True))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """tools: JSON-schema function descriptions ({"type": "function", "function": {...}}), rendered where
        the template has a tools branch (Qwen2.5's ChatML does), as transformers renders them."""
        messages = validate_messages(messages)
        if self.chat_template is None:
            raise InferRecipesError("this model has no chat template: use generate with a plain prompt instead")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise InferRecipesError("tools must be a list of objects ({'type': 'function', 'function': {...}})")
        extra = {"tools": tools} if tools else {}
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, **extra)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
        # the template writes BOS and the role markers itself, so no special tokens are added again
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools), add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back an incomplete UTF-8 character.

    A few prompt tokens serve as left context so that decoders which strip a leading space (SentencePiece)
    still emit the space of the first generated word.
    """

    def __init__(self, tokenizer: LLMTokenizer, prompt_ids: list[int], context: int = 5):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-context:])
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of a sequence: whatever is held back, less a trailing incomplete UTF-8 character."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        delta = full[len(prefix):].rstrip("\ufffd") if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta


def byte_tokenizer() -> LLMTokenizer:
    """One token per UTF-8 byte (ids 0-255) plus <s> and </s>: for synthetic models, whose ids mean nothing."""
    vocab = {c: i for i, c in enumerate(_byte_level_chars())}  # id = the byte's value
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    _with_bos(tok, "<s>", True)
    return LLMTokenizer(tok, "<s>", "</s>", chat_template=_PLAIN_CHAT_TEMPLATE)


def _byte_level_chars() -> list[str]:
    """GPT-2's byte-to-unicode table, indexed by byte: printable bytes stand for themselves, the others in order
    for chr(256), chr(257), ..."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | \
        set(range(ord("®"), ord("ÿ") + 1))
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


_PLAIN_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant: {% endif %}")


def from_gguf(path: str) -> LLMTokenizer:
    from .loading.gguf import array_field, metadata

    meta = metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    tokens = array_field(path, "tokenizer.ggml.tokens")
    if not tokens:
        raise ModelSourceError(f"{path} has no embedded vocabulary (tokenizer.ggml.tokens): use a GGUF with one")
    types = array_field(path, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "llama":
        scores = array_field(path, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        tok = build_spm_bpe(tokens, scores, types, bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
        default_add_bos = True
    elif kind == "gpt2":
        merges = array_field(path, "tokenizer.ggml.merges") or []
        tok = build_byte_bpe(tokens, merges, types, meta.get("tokenizer.ggml.pre", "default"))
        default_add_bos = False
    else:
        raise ModelSourceError(f"unsupported GGUF tokenizer model {kind!r} in {path}: supported are llama, gpt2")

    def token(key):
        tid = meta.get(key)
        return tokens[tid] if tid is not None and 0 <= tid < len(tokens) else None

    bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
    _with_bos(tok, bos, bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)))
    return LLMTokenizer(tok, bos, eos, meta.get("tokenizer.chat_template"))


def _token_content(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def from_directory(directory: str) -> LLMTokenizer:
    """A Hugging Face tokenizer directory: tokenizer.json or tokenizer.model, plus tokenizer_config.json."""
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    cfg = {}
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    bos, eos = _token_content(cfg.get("bos_token")), _token_content(cfg.get("eos_token"))
    json_path, spm_path = os.path.join(directory, "tokenizer.json"), os.path.join(directory, "tokenizer.model")
    if os.path.isfile(json_path):
        tok = Tokenizer.from_file(json_path)
        if cfg.get("add_bos_token") and bos and tok.post_processor is None:
            _with_bos(tok, bos, True)
    elif os.path.isfile(spm_path):
        tok, bos, eos = _from_sentencepiece(spm_path, cfg, bos, eos)
    else:
        raise ModelSourceError(f"{directory} has neither tokenizer.json nor tokenizer.model: add the tokenizer files")
    template = cfg.get("chat_template")
    chat_path = os.path.join(directory, "chat_template.jinja")
    if template is None and os.path.isfile(chat_path):
        with open(chat_path, encoding="utf-8") as f:
            template = f.read()
    if isinstance(template, list):  # a list of named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    return LLMTokenizer(tok, bos, eos, template)


def to_directory(tok: LLMTokenizer, directory: str) -> None:
    """Writes `tok` as `from_directory` reads it back: tokenizer.json (BOS handling in its post-processor) and
    tokenizer_config.json (special tokens, chat template)."""
    tok.tokenizer.save(os.path.join(directory, "tokenizer.json"))
    cfg = {"bos_token": tok.bos_token, "eos_token": tok.eos_token}
    if tok.chat_template is not None:
        cfg["chat_template"] = tok.chat_template.source
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)


def _from_sentencepiece(path: str, cfg: dict, bos: str | None, eos: str | None):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=path)
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    scores = [sp.get_score(i) for i in range(n)]
    types = [6 if sp.is_byte(i) else 3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 1 for i in range(n)]
    tok = build_spm_bpe(pieces, scores, types, add_prefix_space=True)
    bos = bos or (pieces[sp.bos_id()] if sp.bos_id() >= 0 else None)
    eos = eos or (pieces[sp.eos_id()] if sp.eos_id() >= 0 else None)
    _with_bos(tok, bos, cfg.get("add_bos_token", True))
    return tok, bos, eos


def load_tokenizer(source) -> LLMTokenizer:
    """The tokenizer for a `loading.ModelSource`."""
    if source.kind == "gguf":
        return from_gguf(source.location)
    if source.kind == "hf":
        return from_directory(source.location)
    return byte_tokenizer()
