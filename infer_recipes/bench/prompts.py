"""Benchmark prompts of an exact token length, cut from real text: English from SQuAD contexts, Chinese from CMRC
2018 contexts (both in ../shared/data), or any text file."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InferRecipesError

SHARED_DATA = Path(os.environ.get("INFER_RECIPES_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
SOURCES = {"en": SHARED_DATA / "squad" / "dev-v2.0.part-a.json", "zh": SHARED_DATA / "cmrc2018" / "cmrc2018_trial.json"}


@dataclass(frozen=True)
class PromptSet:
    """Texts to cut prompts from, and where they came from."""

    kind: str  # "en", "zh" or "file"
    source: str
    texts: tuple[str, ...]

    def tokens_per_char(self, tokenizer) -> float:
        """How many tokens this tokenizer spends per character of the source text (Chinese differs from English)."""
        sample = self.texts[:64]
        chars = sum(len(t) for t in sample)
        return sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in sample) / max(1, chars)

    def prompts(self, tokenizer, length: int, count: int) -> list[list[int]]:
        """`count` different prompts of exactly `length` token ids: prompt i starts at text i (wrapping round) and
        runs on through the following texts until it is long enough."""
        if length < 1:
            raise InferRecipesError(f"input length must be at least 1, got {length}")
        encoded = [tokenizer.encode(t + "\n\n", add_special_tokens=False) for t in self.texts]
        total = sum(len(e) for e in encoded)
        if total < length:
            raise InferRecipesError(f"the prompt text ({self.source}) has only {total} tokens: {length} are needed; "
                                    "give a longer --prompts FILE")
        bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        out = []
        for i in range(count):
            ids, j = list(bos), i
            while len(ids) < length:
                ids += encoded[j % len(encoded)]
                j += 1
            out.append(ids[:length])
        return out


def load_prompt_set(spec: str) -> PromptSet:
    """spec: en, zh or a path to a UTF-8 text file (split into paragraphs at blank lines)."""
    if spec in SOURCES:
        path = SOURCES[spec]
        if not path.is_file():
            raise InferRecipesError(f"--prompts {spec} cuts prompts from {path}, which is not there (the shared "
                                    "evaluation data); give --prompts FILE with a text file instead")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))["data"]
            texts = tuple(p["context"].strip() for a in data for p in a["paragraphs"])
        except (ValueError, KeyError, TypeError) as e:
            raise InferRecipesError(f"{path} is not a SQuAD-format file ({e})") from None
        return PromptSet(spec, str(path), texts)
    path = Path(spec)
    if not path.is_file():
        raise InferRecipesError(f"--prompts {spec!r}: choose en, zh or an existing text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InferRecipesError(f"--prompts {spec}: not UTF-8 text") from None
    texts = tuple(p.strip() for p in text.split("\n\n") if p.strip())
    if not texts:
        raise InferRecipesError(f"--prompts {spec}: the file is empty")
    return PromptSet("file", str(path), texts)
