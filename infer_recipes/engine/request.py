"""A request's state while it generates, and the output handed back to the caller."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..config import SamplingParams
from ..tokenizer import IncrementalDetokenizer


@dataclass
class RequestOutput:
    """What one prompt produced. finish_reason is "stop" (EOS, stop token or stop string), "length", "abort" or
    "error" (then `error` says why: the request's step failed, see LLMEngine.step)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    metrics: dict = field(default_factory=dict)
    delta: str = ""  # text made visible by the latest step (streaming)
    num_new_tokens: int = 0  # tokens the latest step added (the last ones of token_ids)
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)  # identity: the scheduler finds requests in its queues by `is`
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    detok: IncrementalDetokenizer
    max_len: int  # the context window: prompt + output may not exceed it
    arrival: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    first_token_time: float | None = None
    finish_time: float | None = None
    text_cut: int | None = None  # where a stop string begins in detok.text
    sent: int = 0  # characters of `text` already handed out as deltas
    scanned: int = 0  # characters of detok.text already searched for stop strings
    error: str | None = None  # why the request failed (finish_reason "error")
    generator: object = None  # the request's own torch.Generator when it is seeded
    matcher: object = None  # structured output: the grammar state (runner/grammar.py), fed every token kept
    # what the scheduler keeps (see scheduler.Seq)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_names: list = field(default_factory=list)
    named_blocks: int = 0
    draft: list[int] = field(default_factory=list)  # speculative decoding: this step's proposals
    drafted: int = 0  # draft tokens verified so far, and kept (acceptance = accepted / drafted), in this many steps
    accepted: int = 0
    draft_steps: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_ids)

    def tokens(self, start: int, count: int) -> list[int]:
        """token ids [start, start + count) of prompt + output."""
        p = len(self.prompt_token_ids)
        if start + count <= p:
            return self.prompt_token_ids[start:start + count]
        if start >= p:  # a decode step: no copy of the whole sequence
            return self.output_ids[start - p:start - p + count]
        return (self.prompt_token_ids + self.output_ids)[start:start + count]

    @property
    def text(self) -> str:
        return self.detok.text if self.text_cut is None else self.detok.text[: self.text_cut]

    def append(self, token: int, logprob: float | None, top) -> str:
        """Adds a sampled token; returns the new text it makes visible and sets finish_reason when the request is
        done. Text that could still grow into a stop string is held back, and handed out by a later call (or the
        last one), so the deltas always add up to the final text."""
        now = time.perf_counter()
        self.first_token_time = self.first_token_time or now
        self.output_ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
            self.top_logprobs.append(top)
        if token in self.stop_ids:
            self.finish_reason = "stop"  # the stop token itself is not shown as text
        else:
            self.detok.add(token)
            self._check_stop_strings()
            if self.matcher is not None and self.finish_reason is None:
                if not self.matcher.consume_token(token):
                    self.fail(f"structured output: token {token} does not fit the grammar "
                              f"({self.matcher.get_error() or 'rejected'})")
                    return self._take(len(self.text))
                if self.matcher.is_stopped():
                    self.finish_reason = "stop"  # the grammar is complete: nothing may follow
        if self.finish_reason is None and (len(self.output_ids) >= self.params.max_tokens
                                           or len(self.prompt_token_ids) + len(self.output_ids) >= self.max_len):
            self.finish_reason = "length"
        if self.finish_reason is not None:
            if self.text_cut is None and token not in self.stop_ids:
                self.detok.flush()
                self._check_stop_strings()
            self.finish_time = now
            return self._take(len(self.text))
        hold = max((len(s) - 1 for s in self.params.stop), default=0)
        return self._take(len(self.text) - hold)

    def _take(self, end: int) -> str:
        """The text in [sent, end), now handed out."""
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent:end], end
        return delta

    def fail(self, message: str) -> None:
        """Ends the request with an error (its own, or its step's): the caller gets the message, not a token."""
        self.finish_reason, self.error = "error", message
        self.finish_time = time.perf_counter()

    def _check_stop_strings(self) -> None:
        if not self.params.stop or self.text_cut is not None:
            return
        text = self.detok.text
        # a stop string may begin in the last len - 1 characters already searched and end in the new ones
        start = max(0, self.scanned - max(len(s) for s in self.params.stop) + 1)
        self.scanned = len(text)
        hits = [(i, s) for i, s in ((text.find(s, start), s) for s in self.params.stop) if i >= 0]
        if hits:
            i, s = min(hits)
            self.text_cut = i + len(s) if self.params.include_stop_str_in_output else i
            self.finish_reason = "stop"

    def output(self, delta: str = "", num_new_tokens: int = 0) -> RequestOutput:
        metrics = {"prompt_tokens": len(self.prompt_token_ids), "generated_tokens": len(self.output_ids)}
        if self.drafted:
            metrics.update(draft_tokens=self.drafted, accepted_draft_tokens=self.accepted, draft_steps=self.draft_steps)
        if self.first_token_time is not None:
            metrics["ttft_s"] = self.first_token_time - self.arrival
        if self.finish_time is not None:
            metrics["e2e_s"] = self.finish_time - self.arrival
            if len(self.output_ids) > 1:
                metrics["tpot_s"] = (self.finish_time - self.first_token_time) / (len(self.output_ids) - 1)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, self.text, list(self.output_ids),
                             self.finish_reason, list(self.logprobs) or None, list(self.top_logprobs) or None,
                             metrics, delta, num_new_tokens, self.error)
