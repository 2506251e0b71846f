"""`eval squad` / `eval cmrc` / `eval compare`: our SQuAD numbers equal the official script's, the outputs agree
with each other, and bad data gets one clear line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import data_path, smollm2_gguf
from infer_recipes.eval.compare import Run, thresholds
from infer_recipes.eval.qa import QAExample, QAResult, load_qa
from infer_recipes.eval.qa_metrics import squad_metrics

TINY = "synthetic:tiny-llama3"
OFFICIAL_KEYS = ["exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total", "NoAns_exact", "NoAns_f1",
                 "NoAns_total"]


def run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infer_recipes", *args], capture_output=True, text=True,
                          timeout=timeout)


def official(data: str, predictions: str) -> dict:
    script = data_path("squad", "evaluate-v2.0.py")
    res = subprocess.run([sys.executable, str(script), data, predictions], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def assert_same(ours: dict, theirs: dict) -> None:
    assert set(theirs) == set(ours), (sorted(theirs), sorted(ours))
    for key in theirs:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-9), key


def squad_file(tmp_path, articles) -> str:
    """A SQuAD v2.0 file from [(context, [(id, question, [answers])])]."""
    doc = {"version": "v2.0", "data": [{"title": f"t{i}", "paragraphs": [
        {"context": ctx, "qas": [{"id": qid, "question": q, "is_impossible": not answers,
                                  "answers": [{"text": a, "answer_start": ctx.find(a)} for a in answers]}
                                 for qid, q, answers in qas]}]} for i, (ctx, qas) in enumerate(articles)]}
    path = tmp_path / "tiny-squad.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return str(path)


TINY_ARTICLES = [
    ("Paris is the capital of France. It lies on the Seine.",
     [("q1", "What is the capital of France?", ["Paris"]), ("q2", "Which river?", ["the Seine", "Seine"]),
      ("q3", "Who founded Paris?", [])]),
    ("Rollo was a Viking leader in 911.", [("q4", "Who was Rollo?", ["a Viking leader"]),
                                          ("q5", "When did he die?", [])]),
]


# ---- the official script as the oracle ------------------------------------------------------------------------
def test_model_predictions_score_as_the_official_script_says(tmp_path):
    """300 questions of dev-v2.0 part a answered by SmolLM2 (fastest recipe): our metrics == evaluate-v2.0.py's."""
    smollm2_gguf()
    data = data_path("squad", "dev-v2.0.part-a.json")
    out = tmp_path / "run"
    res = run("eval", "squad", "--recipe", "smollm2-135m-instruct/fastest", "--data", str(data), "--limit", "300",
              "--shots", "2", "--max-tokens", "16", "--batch-size", "16", "--out", str(out), "--json")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == result["questions"] == 300
    assert 0 < sum(1 for p in predictions.values() if p == "") < 300  # both branches of the metric are exercised
    theirs = official(str(out / "data.json"), str(out / "predictions.json"))
    assert theirs["total"] == 300
    assert_same(result["metrics"], theirs)
    assert json.loads((out / "metrics.json").read_text())["metrics"] == result["metrics"]
    # the per-question scores in answers.jsonl add up to the totals
    lines = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert 100 * sum(x["exact"] for x in lines) / 300 == pytest.approx(result["metrics"]["exact"])
    assert 100 * sum(x["f1"] for x in lines) / 300 == pytest.approx(result["metrics"]["f1"])
    assert result["questions_per_s"] * result["seconds"] == pytest.approx(300)
    assert 0 < result["latency_mean_s"] <= result["latency_p99_s"]


def test_edge_predictions_score_as_the_official_script_says(tmp_path):
    """2,000 questions, predictions made from the gold answers to hit every branch: exact, near, empty, wrong."""
    data = data_path("squad", "dev-v2.0.part-a.json")
    examples = load_qa(data, 2000)
    variants = [lambda ex, i: ex.answers[0] if ex.answers else "",
                lambda ex, i: f"The {ex.answers[-1]}." if ex.answers else "unknown",
                lambda ex, i: "",
                lambda ex, i: ex.context.split()[i % len(ex.context.split())],
                lambda ex, i: " ".join(ex.answers[0].split()[: max(1, len(ex.answers[0].split()) // 2)]).upper()
                if ex.answers else "an",
                lambda ex, i: f"“{ex.answers[0]}” and {ex.question}" if ex.answers else "the",
                lambda ex, i: examples[(i * 7) % len(examples)].answers[0] if examples[(i * 7) % len(examples)].answers
                else "   "]
    predictions = {ex.id: variants[i % len(variants)](ex, i) for i, ex in enumerate(examples)}
    ids = {ex.id for ex in examples}
    doc = json.loads(data.read_text())
    for article in doc["data"]:
        for p in article["paragraphs"]:
            p["qas"] = [qa for qa in p["qas"] if qa["id"] in ids]
    (tmp_path / "data.json").write_text(json.dumps(doc))
    (tmp_path / "pred.json").write_text(json.dumps(predictions))
    theirs = official(str(tmp_path / "data.json"), str(tmp_path / "pred.json"))
    assert theirs["total"] == 2000
    assert_same(squad_metrics(examples, predictions), theirs)


# ---- the command on a tiny random model (runs everywhere) ------------------------------------------------------
def test_eval_squad_outputs_are_consistent(tmp_path):
    data = squad_file(tmp_path, TINY_ARTICLES)
    out = tmp_path / "out"
    res = run("eval", "squad", "--model", TINY, "--data", data, "--limit", "4", "--max-tokens", "6",
              "--batch-size", "3", "--out", str(out), "--json")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["questions"] == 4 and result["batch_size"] == 3 and result["model"] == "synthetic:tiny-llama3"
    predictions = json.loads((out / "predictions.json").read_text())
    assert list(predictions) == ["q1", "q2", "q3", "q4"]
    cut = json.loads((out / "data.json").read_text())  # the file cut to the evaluated questions
    assert [qa["id"] for a in cut["data"] for p in a["paragraphs"] for qa in p["qas"]] == ["q1", "q2", "q3", "q4"]
    m = result["metrics"]
    assert set(m) == set(OFFICIAL_KEYS) and m["HasAns_total"] == 3 and m["NoAns_total"] == 1
    examples = load_qa(data, 4)
    assert squad_metrics(examples, predictions) == m
    assert 0 < result["generated_tokens"] <= 4 * 6
    assert result["questions_per_s"] * result["seconds"] == pytest.approx(4)
    # text output names the subsets
    res = run("eval", "squad", "--model", TINY, "--data", data, "--max-tokens", "4", "--shots", "0")
    assert res.returncode == 0, res.stderr
    assert "SQuAD on 5 questions" in res.stdout and "HasAns" in res.stdout and "NoAns" in res.stdout


def test_eval_cmrc_and_too_long_prompts(tmp_path):
    ctx = "《跑跑卡丁车》由韩国Nexon开发。中国大陆由盛大游戏运营。"
    doc = {"version": "v1.0", "data": [{"id": "A", "paragraphs": [{"id": "P", "context": ctx, "qas": [
        {"id": "C1", "question": "谁开发的？", "answers": [{"text": "韩国Nexon", "answer_start": 8}]},
        {"id": "C2", "question": "谁运营？", "answers": [{"text": "盛大游戏", "answer_start": 22}]}]}]},
        {"id": "B", "paragraphs": [{"id": "P2", "context": "长" * 3000, "qas": [
            {"id": "C3", "question": "多长？", "answers": [{"text": "长", "answer_start": 0}]}]}]}]}
    path = tmp_path / "cmrc.json"
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    res = run("eval", "cmrc", "--model", TINY, "--data", str(path), "--max-tokens", "4", "--json")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["task"] == "cmrc" and result["questions"] == 3
    assert set(result["metrics"]) == {"exact", "f1", "average", "total"}
    assert result["prompts_too_long"] == 1  # 9,000 bytes of context > the 2,048-token window: predicted ""


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("{not json", "is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
    ('{"data": [{"paragraphs": [{"qas": []}]}]}', "data[0].paragraphs[0] has no 'context'"),
    ('[1, 2]', "expected an object with a 'data' list"),
    ('{"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "1", "question": "q", "answers": [{"text": "a"}]},'
     '{"id": "1", "question": "q", "answers": []}]}]}]}', "question id '1' appears twice"),
    ('{"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "1", "question": "q", "answers": ["a"]}]}]}]}',
     "answers must be a list of {'text': ...} objects"),
    ('{"data": []}', "holds no questions"),
])
def test_bad_data_gets_one_line(tmp_path, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    res = run("eval", "squad", "--model", TINY, "--data", str(path))
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and message in res.stderr and "Traceback" not in res.stderr
    assert "loaded" not in res.stderr  # the data is checked before the model loads


def test_bad_limit_and_shots(tmp_path):
    data = squad_file(tmp_path, TINY_ARTICLES)
    res = run("eval", "squad", "--model", TINY, "--data", data, "--limit", "0")
    assert res.returncode == 2 and "--limit must be at least 1" in res.stderr
    res = run("eval", "squad", "--model", TINY, "--data", data, "--shots", "7")
    assert res.returncode == 2 and "--shots must be in [0, 3]" in res.stderr


def test_compare_two_models_and_the_cascade(tmp_path):
    data = squad_file(tmp_path, TINY_ARTICLES)
    out = tmp_path / "cmp"
    res = run("eval", "compare", "--models", f"small={TINY},quantization=int8", f"large={TINY}",
              "--policy", "cascade", "--threshold", "-1000", "--data", data, "--max-tokens", "5", "--batch-size", "2",
              "--out", str(out), "--json")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["small", "large", "small + large", "cascade"]
    assert [rows[n]["answers"] for n in rows] == [5, 5, 10, 5]
    for name in ("small", "large"):
        r = rows[name]
        assert r["model_bytes"] > 0 and 0 < r["latency_mean_s"] <= r["latency_p99_s"]
        assert r["questions_per_s"] * r["seconds"] == pytest.approx(5)
    both = rows["small + large"]
    assert both["exact"] == pytest.approx((rows["small"]["exact"] + rows["large"]["exact"]) / 2)
    # both models' weights are the two models' weights; the KV blocks each held at its peak depend on which of
    # its requests overlapped, which timing decides (a block or two apart between runs: not asserted equal)
    assert both["weight_bytes"] == rows["small"]["weight_bytes"] + rows["large"]["weight_bytes"]
    assert both["weight_bytes"] <= both["model_bytes"]
    assert all(0 < rows[n]["weight_bytes"] <= rows[n]["model_bytes"] for n in ("small", "large"))
    assert both["peak_bytes"] > both["model_bytes"]  # the whole process: torch, both models, the pools
    # threshold -1000: every answer of the small model is sure enough, so it answers everything
    assert rows["cascade"]["answered_by"] == {"small": 1.0}
    assert rows["cascade"]["exact"] == pytest.approx(rows["small"]["exact"])
    # the threshold curve: escalating none is the small model's score, all the large model's, shares in order
    sweep = result["thresholds"]
    assert [t["escalated"] for t in sweep] == sorted(t["escalated"] for t in sweep)
    assert sweep[0]["escalated"] == 0 and sweep[0]["exact"] == pytest.approx(rows["small"]["exact"])
    assert sweep[-1]["threshold"] is None and sweep[-1]["escalated"] == 1
    assert (sweep[-1]["exact"], sweep[-1]["f1"]) == pytest.approx((rows["large"]["exact"], rows["large"]["f1"]))
    md = (out / "compare.md").read_text()
    assert md.startswith("| run |") and "| any | 100% |" in md
    assert json.loads((out / "compare.json").read_text())["rows"] == result["rows"]
    # threshold 0: a mean log-probability is never above 0, so the large model re-answers everything
    res = run("eval", "compare", "--models", TINY, f"{TINY},fusion=false", "--policy", "cascade", "--threshold", "0",
              "--data", data, "--max-tokens", "3")
    assert res.returncode == 0, res.stderr
    assert "synthetic:tiny-llama3-2 100%" in res.stdout


def test_the_threshold_curve_keeps_the_small_models_own_answers():
    """The curve from one cascade run: the small model's own answer where it is confident enough, the large
    model's (answered alone) below; the cascade's final answers, which are the large model's for whatever that run
    escalated, are not the small model's."""
    examples = [QAExample(f"q{i}", "?", "c", (f"gold{i}",)) for i in range(4)]
    small = ["gold0", "gold1", "x", "y"]  # right on q0 and q1
    large = ["x", "y", "gold2", "gold3"]  # right on q2 and q3
    cascade = Run("cascade", [QAResult(f"q{i}", large[i], "", 1.0, 1, 1, "stop") for i in range(4)],
                  confidence={"q0": -0.1, "q1": -0.2, "q2": -0.3, "q3": -0.4},  # its run escalated every question
                  small_answers={f"q{i}": small[i] for i in range(4)})
    alone = Run("large", [QAResult(f"q{i}", large[i], "", 1.0, 1, 1, "stop") for i in range(4)])
    curve = {t["escalated"]: t["exact"] for t in thresholds(cascade, alone, "squad", examples)}
    assert curve[0.0] == 50.0 and curve[0.5] == 100.0 and curve[1.0] == 50.0


def test_compare_needs_two_models(tmp_path):
    data = squad_file(tmp_path, TINY_ARTICLES)
    res = run("eval", "compare", "--models", TINY, "--data", data)
    assert res.returncode == 2 and "--models takes two models" in res.stderr
