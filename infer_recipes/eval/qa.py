"""Extractive question answering (SQuAD v1.1 / v2.0, CMRC 2018) through the engine.

Each question becomes a chat prompt (the model's template; a plain text prompt for a model without one): a short
instruction that allows "unanswerable", optional fixed demonstrations, then the context and the question. At most
`batch_size` questions are in flight at once on the continuous-batching engine, so a question's latency is what a
client with that many requests outstanding would see. The reply is cut down to the answer (`extract_answer`) and
scored with the metric of the data set (`qa_metrics`).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..config import SamplingParams
from ..errors import ContextLengthError, InferRecipesError
from ..stats import summary
from .qa_metrics import cmrc_metrics, cmrc_score, squad_metrics, squad_score


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    context: str
    answers: tuple[str, ...]  # gold texts; empty for an unanswerable question

    @property
    def has_answer(self) -> bool:
        return bool(self.answers)


@dataclass
class QAResult:
    id: str
    prediction: str  # the extracted answer ("" = unanswerable)
    raw: str  # what the model wrote
    latency_s: float | None
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str  # stop, length, or too_long (the prompt did not fit the context: predicted "")

    @classmethod
    def answered(cls, qid: str, out, lang: str, latency_s: float | None) -> "QAResult":
        """From the finished RequestOutput of the question's prompt."""
        return cls(qid, extract_answer(out.text, lang), out.text, latency_s, len(out.prompt_token_ids),
                   len(out.token_ids), out.finish_reason)

    @classmethod
    def too_long(cls, qid: str, prompt_tokens: int) -> "QAResult":
        return cls(qid, "", "", None, prompt_tokens, 0, "too_long")


# ---- data -----------------------------------------------------------------------------------------------------------
def load_qa(path: str | os.PathLike, limit: int | None = None) -> list[QAExample]:
    """The questions of a SQuAD-format file (v1.1, v2.0, CMRC 2018) in file order, the first `limit` of them."""
    path = Path(path)
    if not path.is_file():
        raise InferRecipesError(f"data file {path} not found: pass a SQuAD-format JSON file, e.g. "
                                f"../shared/data/squad/dev-v2.0.part-a.json")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise InferRecipesError(f"{path} is not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise InferRecipesError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if limit is not None and limit < 1:
        raise InferRecipesError(f"--limit must be at least 1, got {limit}")
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise InferRecipesError(f"{path} is not in SQuAD format: expected an object with a 'data' list of articles")
    examples, seen = [], set()
    for a, article in enumerate(doc["data"]):
        for p, paragraph in enumerate(_field(article, "paragraphs", list, path, f"data[{a}]")):
            where = f"data[{a}].paragraphs[{p}]"
            context = _field(paragraph, "context", str, path, where)
            for q, qa in enumerate(_field(paragraph, "qas", list, path, where)):
                at = f"{where}.qas[{q}]"
                qid = str(_field(qa, "id", (str, int), path, at))
                if qid in seen:
                    raise InferRecipesError(f"{path}: question id {qid!r} appears twice ({at})")
                seen.add(qid)
                answers = _field(qa, "answers", list, path, at)
                if any(not isinstance(x, dict) or not isinstance(x.get("text"), str) for x in answers):
                    raise InferRecipesError(f"{path}: {at}.answers must be a list of {{'text': ...}} objects")
                examples.append(QAExample(qid, _field(qa, "question", str, path, at), context,
                                          tuple(x["text"] for x in answers)))
                if limit is not None and len(examples) == limit:
                    return examples
    if not examples:
        raise InferRecipesError(f"{path} holds no questions")
    return examples


def _field(obj, key: str, kind, path: Path, where: str):
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind):
        raise InferRecipesError(f"{path} is not in SQuAD format: {where} has no {key!r} "
                                f"({kind.__name__ if isinstance(kind, type) else 'str or int'})")
    return value


def detect_language(examples: list[QAExample]) -> str:
    """'zh' when the contexts are mostly Chinese characters, else 'en'."""
    text = "".join(ex.context for ex in examples[:20])
    chinese = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fa5")
    return "zh" if chinese > 0.3 * max(1, len(text)) else "en"


# ---- prompts --------------------------------------------------------------------------------------------------------
INSTRUCTIONS = {
    "en": "Answer the question with a short phrase copied from the context. If the context does not contain the "
          "answer, reply: unanswerable",
    "zh": "请从上下文中摘录一个简短的片段回答问题。如果上下文中没有答案，请回答：无法回答",
}
# fixed demonstrations (never drawn from the evaluated data): (context, question, answer)
_DEMO_EN = "The Eiffel Tower was completed in 1889 and stands in Paris. It was designed by the engineering " \
           "company of Gustave Eiffel."
_DEMO_ZH = "长城是中国古代的军事防御工程，明长城东起鸭绿江，西至嘉峪关，全长约8851千米。"
DEMONSTRATIONS = {
    "en": [(_DEMO_EN, "Who designed the Eiffel Tower?", "the engineering company of Gustave Eiffel"),
           (_DEMO_EN, "How tall is the Eiffel Tower?", "unanswerable"),
           (_DEMO_EN, "When was the Eiffel Tower completed?", "1889")],
    "zh": [(_DEMO_ZH, "明长城西至哪里？", "嘉峪关"),
           (_DEMO_ZH, "长城每年有多少游客？", "无法回答"),
           (_DEMO_ZH, "明长城全长约多少千米？", "8851千米")],
}
_USER = {"en": "Context: {context}\nQuestion: {question}", "zh": "上下文：{context}\n问题：{question}"}
_ANSWER = {"en": "Answer:", "zh": "答案："}


def build_prompt(tokenizer, example: QAExample, lang: str = "en", shots: int = 0) -> list[int]:
    """Token ids of the question's prompt: chat template when the model has one, else plain text."""
    if not 0 <= shots <= len(DEMONSTRATIONS[lang]):
        raise InferRecipesError(f"--shots must be in [0, {len(DEMONSTRATIONS[lang])}], got {shots}")
    turns = [(_USER[lang].format(context=c, question=q), a) for c, q, a in DEMONSTRATIONS[lang][:shots]]
    turns.append((_USER[lang].format(context=example.context, question=example.question), None))
    if tokenizer.chat_template is not None:
        messages = [{"role": "system", "content": INSTRUCTIONS[lang]}]
        for user, answer in turns:
            messages.append({"role": "user", "content": user})
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
        return tokenizer.encode_chat(messages)
    text = INSTRUCTIONS[lang] + "\n\n" + "\n\n".join(
        f"{user}\n{_ANSWER[lang]}" + (f" {answer}" if answer is not None else "") for user, answer in turns)
    return tokenizer.encode(text)


# ---- answers --------------------------------------------------------------------------------------------------------
_NO_ANSWER = re.compile(
    r"\b(?:unanswerable|not answerable|cannot be answered|can ?not answer|can't be answered|no answer|"
    r"(?:is|are) not (?:mentioned|stated|specified|given|provided))\b|无法回答|没有答案|无答案|未提及", re.IGNORECASE)
_LEAD_EN = re.compile(r"^(?:(?:the\s+)?(?:short\s+)?answer(?:\s+to\s+(?:this|the)\s+question)?(?:\s+is)?|a)"
                      r"\s*(?:[:\-–]\s*|\s(?=\S))", re.IGNORECASE)
_LEAD_ZH = re.compile(r"^(?:答案|回答)(?:是|为)?\s*[:：]?\s*")
_QUOTES = "\"'`*“”‘’「」『』《》"


def extract_answer(text: str, lang: str = "en") -> str:
    """The answer inside a reply: its first non-empty line without lead-ins ("The answer is:", "答案："), quotes
    and a final full stop; "" when the reply says the question cannot be answered."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if _NO_ANSWER.search(line):
        return ""
    lead = _LEAD_ZH if lang == "zh" else _LEAD_EN
    line = lead.sub("", line, count=1).strip()
    line = line.strip(_QUOTES).strip()
    if line.endswith((".", "。")) and line.count(".") + line.count("。") == 1:
        line = line[:-1]
    return line.strip(_QUOTES).strip()


# ---- running --------------------------------------------------------------------------------------------------------
def answer_questions(llm, examples: list[QAExample], lang: str = "en", shots: int = 0, batch_size: int = 16,
                     max_tokens: int = 32, progress: bool = True) -> tuple[list[QAResult], float]:
    """Answers every question greedily, at most batch_size in flight; returns results in order and seconds."""
    if batch_size < 1:
        raise InferRecipesError(f"--batch-size must be at least 1, got {batch_size}")
    engine = llm.engine
    if engine.driver is not None or engine.has_unfinished_requests():
        raise InferRecipesError("this LLM's engine is serving other requests: use one LLM per evaluation")
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    results: dict[str, QAResult] = {}
    prompts = [build_prompt(llm.tokenizer, ex, lang, shots) for ex in examples]
    pending = list(range(len(examples)))[::-1]  # popped from the end: file order
    running: dict[str, int] = {}
    bar = tqdm(total=len(examples), desc="answering", unit="question", disable=not progress, file=sys.stderr)
    start = time.perf_counter()
    try:
        while pending or running:
            while pending and len(running) < batch_size:
                i = pending.pop()
                try:
                    running[engine.add_request(prompts[i], params, f"qa-{i}")] = i
                except ContextLengthError:
                    results[examples[i].id] = QAResult.too_long(examples[i].id, len(prompts[i]))
                    bar.update(1)
            for out in engine.step():
                if out.finished:
                    qid = examples[running.pop(out.request_id)].id
                    results[qid] = QAResult.answered(qid, out, lang, out.metrics.get("e2e_s"))
                    bar.update(1)
    except BaseException:
        for request_id in running:
            engine.abort_request(request_id)
        raise
    finally:
        bar.close()
    return [results[ex.id] for ex in examples], time.perf_counter() - start


# task -> (metrics over a question set, (EM, F1) of one question)
METRICS = {"squad": (squad_metrics, squad_score), "cmrc": (cmrc_metrics, cmrc_score)}


def score(task: str, examples: list[QAExample], predictions: dict[str, str]) -> dict:
    return METRICS[task][0](examples, predictions)


def report(task: str, examples: list[QAExample], results: list[QAResult], seconds: float, **meta) -> dict:
    """Metrics and timings of one evaluation run, as written to metrics.json."""
    latencies = [r.latency_s for r in results if r.latency_s is not None]
    lat = summary(latencies)
    return {"task": task, **meta, "questions": len(examples),
            "metrics": score(task, examples, {r.id: r.prediction for r in results}),
            "seconds": seconds, "questions_per_s": len(examples) / seconds if seconds > 0 else None,
            "latency_mean_s": lat["mean"], "latency_median_s": lat["median"], "latency_p99_s": lat["p99"],
            "prompt_tokens": sum(r.prompt_tokens for r in results),
            "generated_tokens": sum(r.generated_tokens for r in results),
            "unanswered": sum(1 for r in results if r.prediction == ""),
            "prompts_too_long": sum(1 for r in results if r.finish_reason == "too_long")}


def write_outputs(out_dir: str | os.PathLike, task: str, examples: list[QAExample], results: list[QAResult],
                  summary_: dict, data_path: str | os.PathLike) -> None:
    """predictions.json ({id: answer}, the official format), metrics.json, answers.jsonl (one line per
    question: gold answers, the raw reply, the extracted answer, its scores) and data.json: the data file cut to
    the evaluated questions, so the official script runs as `evaluate-v2.0.py DIR/data.json DIR/predictions.json`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = {ex.id for ex in examples}
    doc = json.loads(Path(data_path).read_text(encoding="utf-8"))
    for article in doc["data"]:
        for paragraph in article["paragraphs"]:
            paragraph["qas"] = [qa for qa in paragraph["qas"] if str(qa["id"]) in ids]
        article["paragraphs"] = [p for p in article["paragraphs"] if p["qas"]]
    doc["data"] = [a for a in doc["data"] if a["paragraphs"]]
    (out / "data.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    scorer = METRICS[task][1]
    (out / "predictions.json").write_text(json.dumps({r.id: r.prediction for r in results}, ensure_ascii=False,
                                                     indent=1), encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps(summary_, ensure_ascii=False, indent=1), encoding="utf-8")
    with open(out / "answers.jsonl", "w", encoding="utf-8") as f:
        for ex, r in zip(examples, results):
            em, f1 = scorer(ex.answers, r.prediction)
            f.write(json.dumps({"id": ex.id, "question": ex.question, "gold": list(ex.answers), "raw": r.raw,
                                "prediction": r.prediction, "exact": em, "f1": f1, "latency_s": r.latency_s,
                                "finish_reason": r.finish_reason}, ensure_ascii=False) + "\n")
