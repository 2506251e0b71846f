"""Question-answering metrics with the official semantics of SQuAD 2.0 and of CMRC 2018.

SQuAD: answers are normalized (lower case, ASCII punctuation removed, the articles a/an/the removed, white space
collapsed); exact match and bag-of-tokens F1 are taken as the best over the gold answers; a question without a gold
answer (unanswerable) is scored against the empty answer, so only an empty prediction earns it 1.

CMRC 2018: text is lower-cased and cut into "mixed segments": every Chinese character is one segment, and a run of
other characters is split into words (runs of letters and digits) and single punctuation marks; F1 compares the
longest common run of segments; exact match compares the texts with CMRC's punctuation removed.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable

# ---------------------------------------------------------------------------------------------------------------
# SQuAD 2.0
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_ASCII_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _ASCII_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def squad_exact(gold: str, prediction: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(prediction))


def squad_f1(gold: str, prediction: str) -> float:
    gold_tokens, pred_tokens = _tokens(gold), _tokens(prediction)
    if not gold_tokens or not pred_tokens:  # an empty side scores 1 only when both are empty
        return float(gold_tokens == pred_tokens)
    same = sum((Counter(gold_tokens) & Counter(pred_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_golds(answers: Iterable[str]) -> list[str]:
    """The gold answers that count: those with text left after normalization, else the empty answer."""
    return [a for a in answers if normalize_answer(a)] or [""]


def squad_score(answers: Iterable[str], prediction: str) -> tuple[int, float]:
    """(exact match, F1) of one prediction, each the best over the gold answers."""
    golds = squad_golds(answers)
    return max(squad_exact(g, prediction) for g in golds), max(squad_f1(g, prediction) for g in golds)


def squad_metrics(examples, predictions: dict[str, str]) -> dict:
    """The official script's numbers (percentages): exact, f1, total, and HasAns_* / NoAns_* for the subsets
    present. `examples`: objects with id, answers (list of texts) and has_answer; every id must be predicted."""
    exact, f1, has_answer = {}, {}, {}
    for ex in examples:
        exact[ex.id], f1[ex.id] = squad_score(ex.answers, predictions[ex.id])
        has_answer[ex.id] = ex.has_answer
    out = _averages(exact, f1, list(exact))
    for name, wanted in (("HasAns", True), ("NoAns", False)):
        ids = [i for i, h in has_answer.items() if h == wanted]
        if ids:
            out.update({f"{name}_{k}": v for k, v in _averages(exact, f1, ids).items()})
    return out


def _averages(exact: dict, f1: dict, ids: list[str]) -> dict:
    n = len(ids)
    return {"exact": 100.0 * sum(exact[i] for i in ids) / n if n else 0.0,
            "f1": 100.0 * sum(f1[i] for i in ids) / n if n else 0.0, "total": n}


# ---------------------------------------------------------------------------------------------------------------
# CMRC 2018
# the marks CMRC's scorer removes or splits on, one character each (its list also holds the two-character
# "……", which a character-by-character scan never meets)
CMRC_PUNCTUATION = frozenset("-:_*^/\\~`+=，。：？！“”；’《》·、「」（）－～『』")
_CHINESE = re.compile(r"[\u4e00-\u9fa5]")
_WORDS = re.compile(r"[^\W_]+|[^\w\s]|_")


def _split_run(run: str) -> list[str]:
    """A run of non-Chinese text as words: letters and digits together, any other mark on its own."""
    return _WORDS.findall(run)


def mixed_segmentation(text: str, remove_punctuation: bool = False) -> list[str]:
    segments, run = [], ""
    for ch in text.lower().strip():
        if remove_punctuation and ch in CMRC_PUNCTUATION:
            continue  # dropped without ending the run: "a-b" reads as "ab"
        if _CHINESE.match(ch) or ch in CMRC_PUNCTUATION:
            segments.extend(_split_run(run))
            run = ""
            segments.append(ch)
        else:
            run += ch
    segments.extend(_split_run(run))
    return segments


def remove_cmrc_punctuation(text: str) -> str:
    return "".join(ch for ch in text.lower().strip() if ch not in CMRC_PUNCTUATION)


def longest_common_run(a: list[str], b: list[str]) -> int:
    """Length of the longest common contiguous run of segments."""
    best, previous = 0, [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            if x == y:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best


def cmrc_f1(gold: str, prediction: str) -> float:
    gold_segments = mixed_segmentation(gold, remove_punctuation=True)
    pred_segments = mixed_segmentation(prediction, remove_punctuation=True)
    common = longest_common_run(gold_segments, pred_segments)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_segments), common / len(gold_segments)
    return 2 * precision * recall / (precision + recall)


def cmrc_exact(gold: str, prediction: str) -> int:
    return int(remove_cmrc_punctuation(gold) == remove_cmrc_punctuation(prediction))


def cmrc_score(answers: Iterable[str], prediction: str) -> tuple[int, float]:
    answers = list(answers)
    if not answers:
        return 0, 0.0
    return max(cmrc_exact(a, prediction) for a in answers), max(cmrc_f1(a, prediction) for a in answers)


def cmrc_metrics(examples, predictions: dict[str, str]) -> dict:
    """Percentages as CMRC's scorer reports them: exact (EM), f1, their average, total."""
    exact = f1 = 0.0
    for ex in examples:
        e, f = cmrc_score(ex.answers, predictions[ex.id])
        exact, f1 = exact + e, f1 + f
    n = len(examples)
    em, f1 = (100.0 * exact / n, 100.0 * f1 / n) if n else (0.0, 0.0)
    return {"exact": em, "f1": f1, "average": (em + f1) / 2, "total": n}
