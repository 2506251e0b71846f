"""Tool calling, OpenAI's `tools`: the functions go into the prompt through the model's own chat template, a
`tool_choice` of `required` or a named function is enforced with a grammar written in the model's own call syntax
(so the arguments always match the function's JSON schema), and the calls are parsed out of the model's text,
whole or as it streams.

The call syntax is the one Qwen2.5 (and Hermes-style templates) teach the model:
`<tool_call>\\n{"name": NAME, "arguments": {...}}\\n</tool_call>`, one block per call. A template that does not
render tools, or teaches another syntax, is refused with the reason rather than guessed at.
"""
from __future__ import annotations

import json
import re
import uuid
import weakref

from ..config import Constraint
from ..errors import InferRecipesError
from ..tokenizer import LLMTokenizer

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_PROBE = "probe_function_7f3a"  # a name no template writes by itself
# the head of a call in the syntax above, up to where the arguments' value starts
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
# the same head without the tag, maybe in a ```json fence: Qwen2.5-Coder often writes its calls so (it was not
# trained on the tags); and what may follow such a call: its closing brace, the fence's end, whitespace
_BARE_HEAD = re.compile(r'\s*(?:```(?:json)?\s*)?\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_BARE_TAIL = re.compile(r"\s*\}?\s*(?:```)?\s*")
_BARE_HEAD_CHARS = 256  # a head longer than this is no call (a name has at most 64 characters)
# arguments as the templates write them back (tojson): ", " and ": ", no other whitespace (free whitespace lets a
# small model loop on newlines)
_ARGUMENT_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


_UNSUPPORTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # per tokenizer, gone with its model


def unsupported(tokenizer: LLMTokenizer) -> str | None:
    """Why this model's chat template cannot do tool calling, or None when it can (probed once per tokenizer)."""
    if tokenizer not in _UNSUPPORTED:
        _UNSUPPORTED[tokenizer] = _probe(tokenizer)
    return _UNSUPPORTED[tokenizer]


def _probe(tokenizer: LLMTokenizer) -> str | None:
    tool = {"type": "function", "function": {"name": _PROBE, "parameters": {"type": "object", "properties": {}}}}
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[tool])
    except InferRecipesError as e:
        return str(e)
    if _PROBE not in text:
        return "its chat template has no tools branch (it ignores the functions it is given)"
    if OPEN not in text:
        return f"its chat template teaches a tool-call syntax other than {OPEN}...{CLOSE}, the one parsed here"
    return None


def constraint(tools: list[dict], mode: str, parallel: bool, tokenizer: LLMTokenizer) -> Constraint:
    """A grammar (Lark, for llguidance) that admits only calls in the model's syntax: of any of the tools
    (`mode` 'required') or of the function named `mode`; one call, or several one per line when `parallel`.
    The arguments follow each function's JSON schema (any object when it has none)."""
    # a marker the tokenizer holds as one added token is written as that token (llguidance matches added tokens
    # by id, not by their text)
    added = {t.content for t in tokenizer.tokenizer.get_added_tokens_decoder().values()}
    open_, close = ((m if m in added else json.dumps(m)) for m in (OPEN, CLOSE))
    chosen = [t for t in tools if mode == "required" or t["function"]["name"] == mode]
    newline, tail = json.dumps("\n"), json.dumps("}\n")
    rules = []
    for i, tool in enumerate(chosen):
        fn = tool["function"]
        schema = fn.get("parameters") or {"type": "object", "properties": {}}
        schema = {**schema, "x-guidance": {**_ARGUMENT_STYLE, **schema.get("x-guidance", {})}}
        head = json.dumps('\n{"name": ' + json.dumps(fn["name"], ensure_ascii=False) + ', "arguments": ')
        rules.append(f"call_{i}: {open_} {head} args_{i} {tail} {close}\n"
                     f"args_{i}: %json {json.dumps(schema)}")
    calls = " | ".join(f"call_{i}" for i in range(len(chosen)))
    # a newline may end the answer: after a call Qwen2.5-Coder writes one before <|im_end|>; were it only the
    # separator of parallel calls, the 0.5B went on calling until max_tokens (8 of 8 answers; 0 of 8 with it)
    start = f"start: call ({newline} call)* {newline}?" if parallel else f"start: call {newline}?"
    return Constraint("grammar", "\n".join([start, f"call: {calls}", *rules]))


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallParser:
    """One choice's text, fed as it is generated, into OpenAI's message deltas: `{"content": ...}` for text, a
    `{"tool_calls": [{index, id, type, function: {name, arguments: ""}}]}` when a call's name is known, then
    `{"tool_calls": [{index, function: {arguments: ...}}]}` as its arguments arrive. The whole text fed at once
    gives the same deltas as fed piece by piece, so a streamed answer reassembles into the non-streamed one.

    Calls come tagged (`<tool_call>...</tool_call>`, anywhere in the text) or, when `names` are given, bare: an
    answer that starts as `{"name": ..., "arguments": ...}` (maybe in a ```json fence) with the name of one of
    those functions. Text that may still become a call (a partial tag, whitespace before one, the start of a bare
    head) is held back until it is known. A tagged block that is not `{"name": ..., "arguments": ...}` in that
    order is parsed whole at its end, and one that is not JSON at all stays text."""

    def __init__(self, names: frozenset[str] = frozenset()):
        self.names = names
        self.state, self.buffer, self.calls = ("start" if names else "text"), "", 0
        self.value: _JSONValue | None = None
        self.after = "tail"  # the state after a call's arguments: "tail" (tagged) or "bare_tail"

    def feed(self, text: str) -> list[dict]:
        self.buffer += text
        deltas: list[dict] = []
        while self._step(deltas):
            pass
        return deltas

    def finish(self) -> list[dict]:
        """What is held back, at the end of the text."""
        deltas: list[dict] = []
        if self.state in ("text", "start") and (self.buffer.strip() or (self.buffer and not self.calls)):
            deltas.append({"content": self.buffer})  # (whitespace after the calls is no answer)
        elif self.state == "head":  # a call cut short (max_tokens), or ended without its closing tag
            deltas += self._whole(self.buffer, closed=False)
        self.state, self.buffer = "text", ""
        return deltas

    def _step(self, deltas: list[dict]) -> bool:
        """One move of the state machine over the buffer; False when it needs more text."""
        if self.state == "start":  # the answer so far may be a bare call
            head = _BARE_HEAD.match(self.buffer)
            name = json.loads(f'"{head.group(1)}"') if head is not None else None
            if name in self.names:
                deltas.append(self._start(name))
                self.buffer, self.state, self.value = self.buffer[head.end():], "args", _JSONValue()
                self.after = "bare_tail"
                return True
            if head is None and len(self.buffer) <= _BARE_HEAD_CHARS and _may_open_bare_call(self.buffer):
                return False
            self.state = "text"
            return True
        if self.state == "text":
            at = self.buffer.find(OPEN)
            if at < 0:
                keep = _held_back(self.buffer)
                if len(self.buffer) > keep:
                    deltas.append({"content": self.buffer[:len(self.buffer) - keep]})
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                return False
            before = self.buffer[:at].rstrip()
            if before:
                deltas.append({"content": before})
            self.buffer, self.state = self.buffer[at + len(OPEN):], "head"
            return True
        if self.state == "head":
            close = self.buffer.find(CLOSE)
            head = _HEAD.match(self.buffer)
            if head is not None and (close < 0 or head.end() <= close):
                deltas.append(self._start(json.loads(f'"{head.group(1)}"')))
                self.buffer, self.state, self.value = self.buffer[head.end():], "args", _JSONValue()
                self.after = "tail"
                return True
            if close < 0:
                return False
            deltas += self._whole(self.buffer[:close], closed=True)
            self.buffer, self.state = self.buffer[close + len(CLOSE):], "text"
            return True
        if self.state == "args":
            part, rest = self.value.feed(self.buffer)
            if part:
                deltas.append(_arguments(self.calls - 1, part))
            self.buffer = rest or ""
            if rest is None:
                return False
            self.state = self.after
            return True
        if self.state == "bare_tail":  # the call's closing brace and fence; then another bare call, or text
            rest = self.buffer[_BARE_TAIL.match(self.buffer).end():]
            if not rest or "```".startswith(rest):
                return False
            self.buffer, self.state = rest, ("start" if rest[0] in "{`" else "text")
            return True
        close = self.buffer.find(CLOSE)  # tail: what closes the call ("}\n"), then its tag
        if close < 0:
            return False
        self.buffer, self.state = self.buffer[close + len(CLOSE):], "text"
        return True

    def _start(self, name: str) -> dict:
        self.calls += 1
        return {"tool_calls": [{"index": self.calls - 1, "id": new_call_id(), "type": "function",
                                "function": {"name": name, "arguments": ""}}]}

    def _whole(self, body: str, closed: bool) -> list[dict]:
        """A call block parsed at once: its deltas, or the block as text when it is no call."""
        try:
            call = json.loads(body)
        except ValueError:
            call = None
        args = call.get("arguments", call.get("parameters")) if isinstance(call, dict) else None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or args is None:
            return [{"content": OPEN + body + (CLOSE if closed else "")}]
        return [self._start(call["name"]),
                _arguments(self.calls - 1, args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))]


def _may_open_bare_call(text: str) -> bool:
    """Whether text may still grow into the head of a bare call: `{"name": "`, maybe after a ```json fence,
    whitespace allowed between the pieces."""
    rest = text.lstrip()
    if rest.startswith("```"):
        rest = rest[3:]
        if "json".startswith(rest):
            return True
        rest = rest.removeprefix("json")
    elif "```".startswith(rest) and rest:
        return True
    for piece in ("{", '"name"', ":", '"'):
        rest = rest.lstrip()
        if not rest or piece.startswith(rest):
            return True
        if not rest.startswith(piece):
            return False
        rest = rest[len(piece):]
    return True  # the name is being written: the head's pattern decides once it is whole


def _arguments(index: int, text: str) -> dict:
    return {"tool_calls": [{"index": index, "function": {"arguments": text}}]}


def _held_back(text: str) -> int:
    """How many characters at the end of text may be the start of a call: a partial OPEN and the whitespace
    before it."""
    partial = next((k for k in range(min(len(OPEN) - 1, len(text)), 0, -1) if text.endswith(OPEN[:k])), 0)
    end = len(text) - partial
    start = end
    while start > 0 and text[start - 1].isspace():
        start -= 1
    return len(text) - start


class _JSONValue:
    """Where one JSON value ends, in text that arrives piece by piece: strings with their escapes, nesting,
    scalars. Whitespace before the value is not part of it."""

    def __init__(self):
        self.started = self.in_string = self.escaped = self.scalar = False
        self.depth = 0

    def feed(self, text: str) -> tuple[str, str | None]:
        """(the part of text that belongs to the value, the text after the value or None while it goes on)"""
        begin = 0
        for i, ch in enumerate(text):
            if not self.started:
                if ch.isspace():
                    begin = i + 1
                    continue
                self.started, self.scalar = True, ch not in '{["'
                self.in_string, self.depth = ch == '"', int(ch in "{[")
                continue
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                    if self.depth == 0:
                        return text[begin:i + 1], text[i + 1:]
            elif self.scalar:
                if ch in ",}] \t\r\n":
                    return text[begin:i], text[i:]
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return text[begin:i + 1], text[i + 1:]
        return text[begin:], None


def message(deltas: list[dict]) -> dict:
    """OpenAI's assistant message from a choice's deltas: content (None when there are calls and no text), and
    the tool calls when there are any."""
    content, calls = "", []
    for d in deltas:
        content += d.get("content", "")
        for call in d.get("tool_calls", ()):
            if "id" in call:
                calls.append({"id": call["id"], "type": "function", "function": dict(call["function"])})
            else:
                calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
    out = {"role": "assistant", "content": content if content or not calls else None}
    if calls:
        out["tool_calls"] = calls
    return out
