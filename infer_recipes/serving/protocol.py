"""The OpenAI wire format: request bodies (strictly typed, as OpenAI types them, with errors that name the field),
their translation into SamplingParams, the response shapes and the error object."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import Constraint, SamplingParams

INT64 = 2**63


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def server_error(message: str, code: str | None = None) -> APIError:
    return APIError(500, message, "server_error", None, code)


class _Strict(BaseModel):
    # OpenAI's types, no coercion: "10" is not a number, true is not a token id; an unknown field is an error,
    # never silently dropped
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class JSONSchemaFormat(_Strict):
    """OpenAI's `response_format.json_schema` (what `client.beta.chat.completions.parse` sends)."""

    name: str
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object ({'name': ..., 'schema': {...}})")
        return self


# structured output as other servers take it: vLLM's guided_* and llama.cpp's json_schema / grammar
_GUIDES = ("response_format", "guided_json", "guided_regex", "guided_grammar", "guided_choice", "json_schema",
           "grammar")


class _Sampling(_Strict):
    """Fields shared by completions and chat completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # the end user's id: for the operator's logs, it changes nothing in the answer
    # extensions that vLLM and llama.cpp accept too
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    ignore_eos: bool = False
    # structured output (at most one of these)
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_choice: list[str] | None = None
    json_schema: dict[str, Any] | None = None
    grammar: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"biases must be in [-100, 100], got {bias!r} for token {key}")
        return v

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @model_validator(mode="after")
    def _one_constraint(self):
        given = self._guides()
        if len(given) > 1:
            raise ValueError(f"give one structured-output constraint, not {len(given)} ({', '.join(given)})")
        if self.guided_choice is not None and not self.guided_choice:
            raise ValueError("guided_choice must list at least one string")
        return self

    def _guides(self) -> list[str]:
        """The structured-output fields given (a response_format of type text asks for nothing)."""
        return [g for g in _GUIDES if getattr(self, g) is not None
                and not (g == "response_format" and self.response_format.type == "text")]

    @property
    def constraint_param(self) -> str:
        """The field that carries the constraint (for a 400 about it)."""
        return next(iter(self._guides()), "response_format")

    def constraint(self) -> Constraint | None:
        """What the output must match, if anything."""
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            return Constraint("json_object")
        if rf is not None and rf.type == "json_schema":
            return Constraint("json_schema", json.dumps(rf.json_schema.schema_))
        if self.guided_json is not None or self.json_schema is not None:
            schema = self.guided_json if self.guided_json is not None else self.json_schema
            return Constraint("json_schema", schema if isinstance(schema, str) else json.dumps(schema))
        if self.guided_regex is not None:
            return Constraint("regex", self.guided_regex)
        if self.guided_grammar is not None or self.grammar is not None:
            return Constraint("grammar", self.guided_grammar if self.guided_grammar is not None else self.grammar)
        if self.guided_choice is not None:
            return Constraint("choice", json.dumps(self.guided_choice))
        return None

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, min_p=self.min_p, seed=self.seed, stop=tuple(self.stop or ()),
                              ignore_eos=self.ignore_eos, logprobs=logprobs,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              logit_bias={int(k): b for k, b in (self.logit_bias or {}).items()},
                              constraint=self.constraint())


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)  # top alternatives per token (OpenAI: 0-5; here up to 20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if v == "" or v == [] or (isinstance(v, list) and any(p == "" or p == [] for p in v)):
            raise ValueError("the prompt is empty")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (use n)")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """One prompt per item: a string, a list of strings, token ids or lists of token ids."""
        raw = self.prompt
        return [raw] if isinstance(raw, str) or isinstance(raw[0], int) else list(raw)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    @field_validator("arguments")
    @classmethod
    def _json(cls, v):
        try:
            json.loads(v)
        except ValueError as e:
            raise ValueError(f"must be JSON text (the function's arguments): {e}") from None
        return v


class ToolCall(_Strict):
    """A call the assistant made earlier in the conversation (sent back by the client)."""

    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None  # OpenAI's assistant messages carry it; a client may send one back

    @model_validator(mode="after")
    def _content(self):
        if self.content is None and not (self.role == "assistant" and (self.tool_calls or self.refusal)):
            what = "content or tool_calls" if self.role == "assistant" else "content"
            raise ValueError(f"{'an' if self.role[0] in 'aeiou' else 'a'} {self.role} message needs {what}")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, not {self.role} messages")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def as_template_message(self) -> dict:
        """The message as chat templates expect it: role (developer as system), content a string, a call's
        arguments as an object (templates write them out with tojson, as transformers passes them)."""
        content = self.content if not isinstance(self.content, list) else "".join(p.text for p in self.content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": json.loads(c.function.arguments)}} for c in self.tool_calls]
        return message


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: a function without arguments
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # None: true, as OpenAI defaults it

    @model_validator(mode="after")
    def _checks(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    @model_validator(mode="after")
    def _tools(self):
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) < len(names):
            raise _Unsupported("tools", f"tools: two functions share a name ({', '.join(sorted(names))}); "
                                        f"give each function its own name")
        if self.tool_choice in ("required",) or isinstance(self.tool_choice, NamedToolChoice):
            if not names:
                raise _Unsupported("tool_choice", "tool_choice asks for a function call but no tools were given")
            if self._guides():
                raise _Unsupported("tool_choice", f"tool_choice {self.tool_choice!r} constrains the output to a "
                                   f"function call: it cannot be combined with {self._guides()[0]}")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise _Unsupported("tool_choice", f"tool_choice names the function {self.tool_choice.function.name!r}, "
                               f"which is not among the tools ({', '.join(names)})")
        return self

    @property
    def tool_mode(self) -> str | None:
        """How the model may call the tools: None (no tools, or tool_choice none), 'auto' (it chooses),
        'required' (at least one call) or the name of the one function it must call."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or "auto"

    def template_tools(self) -> list[dict] | None:
        """The tools as the chat template renders them (none when the model may not call them)."""
        return _template_tools(self.tools) if self.tool_mode is not None else None

    def template_messages(self) -> list[dict]:
        return [m.as_template_message() for m in self.messages]


def _template_tools(tools: list[Tool] | None) -> list[dict] | None:
    """Tools as chat templates take them (transformers' form: plain dicts, unset fields left out)."""
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None


class TokenizeRequest(_Strict):
    """vLLM's `POST /tokenize`: a prompt, or a conversation rendered through the chat template."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[Tool] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (the template has them)
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        if self.tools is not None and self.messages is None:
            raise ValueError("tools go with messages (they are rendered by the chat template)")
        return self

    def template_tools(self) -> list[dict] | None:
        return _template_tools(self.tools)

    def template_messages(self) -> list[dict]:
        return [m.as_template_message() for m in self.messages]


class DetokenizeRequest(_Strict):
    model: str
    tokens: list[int] = Field(min_length=1)


class _Unsupported(ValueError):
    """A field we know but do not implement: a 400 that names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


_TYPE_HINTS = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "must be a string or a list of strings",
    "content": "must be a string or a list of text parts ({'type': 'text', 'text': ...})",
    "tool_choice": "must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
}


def parse(model: type[BaseModel], body: Any) -> BaseModel:
    """The body as `model`, or a 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, _Unsupported):
            raise bad_request(str(cause), cause.param, "unsupported_parameter") from None
        loc = [str(p) for p in err["loc"]]
        field = next((p for p in reversed(loc) if p in _TYPE_HINTS), None)
        if loc and loc[0] == "tool_choice" and not isinstance(cause, ValueError):  # whichever member complained
            raise bad_request(f"tool_choice {_TYPE_HINTS['tool_choice']}, got {_shown(body.get('tool_choice'))}",
                              "tool_choice") from None
        if field is not None and err["type"].endswith("_type"):  # a union's members: one message for the field
            where = ".".join(loc[:loc.index(field) + 1])
            raise bad_request(f"{where} {_TYPE_HINTS[field]}, got {_shown(err.get('input'))}", loc[0]) from None
        param = ".".join(p for p in loc if p not in ("str", "int", "list[str]", "list[int]")) or None
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            message = f"'{param}' is a required field"
        elif err["type"] == "extra_forbidden":
            message = f"'{param}' is not a supported field"
        elif param:
            message = f"{param}: {message}"
            if "input" in err and not isinstance(err["input"], (dict, list)):
                message += f", got {_shown(err['input'])}"
        raise bad_request(message, loc[0] if loc else None) from None


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, metrics=()) -> dict:
    """OpenAI's usage; with speculative decoding, what the guesses did (over the choices' `metrics`)."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    drafted, kept, steps = (sum(m.get(k, 0) for m in metrics) for k in
                            ("draft_tokens", "accepted_draft_tokens", "draft_steps"))
    if drafted:
        out["speculative"] = {"draft_tokens": drafted, "accepted_tokens": kept,
                              "acceptance_rate": round(kept / drafted, 4),
                              "mean_accepted_length": round(kept / steps, 4)}
    return out
