"""QA metrics: SQuAD 2.0 and CMRC 2018 semantics on hand-checked edge cases, and answer extraction."""
import pytest

from infer_recipes.eval.qa import QAExample, extract_answer
from infer_recipes.eval.qa_metrics import (cmrc_exact, cmrc_f1, cmrc_metrics, longest_common_run,
                                           mixed_segmentation, normalize_answer, squad_exact, squad_f1,
                                           squad_metrics, squad_score)


@pytest.mark.parametrize("text, expected", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  an   apple, a pear!  ", "apple pear"),
    ("Theatre", "theatre"),                    # an article only as a whole word
    ("A.B.C.", "abc"),                         # punctuation goes before articles are looked for
    ("a-the-an", "athean"),                    # punctuation removed first: one word, no article left
    ("THE", ""),
    ("“quoted”", "“quoted”"),                  # only ASCII punctuation is removed
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_squad_exact_and_f1():
    assert squad_exact("the Eiffel Tower", "Eiffel tower.") == 1
    assert squad_exact("Paris", "in Paris") == 0
    assert squad_f1("in Paris", "Paris") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert squad_f1("w b c d", "c d e") == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert squad_f1("a b c d", "c d e") == pytest.approx(2 / 3)  # the article 'a' is not a token
    assert squad_f1("x x y", "x y y") == pytest.approx(2 / 3)  # multiset overlap: one x, one y
    assert squad_f1("Paris", "London") == 0.0


def test_empty_gold_and_empty_prediction():
    # unanswerable: only an empty prediction scores
    assert squad_score([], "") == (1, 1.0)
    assert squad_score([], "Paris") == (0, 0.0)
    # a gold answer that normalizes to nothing counts as no answer
    assert squad_score(["the", "."], "") == (1, 1.0)
    # an answerable question left empty scores nothing
    assert squad_score(["Paris"], "") == (0, 0.0)
    # a prediction that normalizes to nothing behaves as empty
    assert squad_score(["Paris"], "the") == (0, 0.0)
    assert squad_score([], "a") == (1, 1.0)


def test_best_over_gold_answers():
    em, f1 = squad_score(["Denver Broncos", "the Broncos", "Broncos"], "Broncos")
    assert em == 1 and f1 == 1.0
    em, f1 = squad_score(["Denver Broncos", "Carolina Panthers"], "Denver")
    assert em == 0 and f1 == pytest.approx(2 / 3)


def test_squad_metrics_breakdown():
    examples = [QAExample("1", "q", "c", ("Paris",)), QAExample("2", "q", "c", ()),
                QAExample("3", "q", "c", ("in 1889", "1889")), QAExample("4", "q", "c", ())]
    preds = {"1": "Paris", "2": "", "3": "1889 or so", "4": "something"}
    m = squad_metrics(examples, preds)
    assert m["total"] == 4 and m["HasAns_total"] == 2 and m["NoAns_total"] == 2
    assert m["exact"] == pytest.approx(50.0)
    assert m["HasAns_exact"] == pytest.approx(50.0) and m["NoAns_exact"] == pytest.approx(50.0)
    f1_3 = 2 * (1 / 3) * 1.0 / (1 / 3 + 1.0)
    assert m["HasAns_f1"] == pytest.approx(100 * (1 + f1_3) / 2)
    assert m["f1"] == pytest.approx(100 * (1 + 1 + f1_3 + 0) / 4)
    only_has = squad_metrics(examples[:1], preds)
    assert "NoAns_total" not in only_has and only_has["HasAns_total"] == 1


def test_mixed_segmentation():
    assert mixed_segmentation("北京是首都") == ["北", "京", "是", "首", "都"]
    assert mixed_segmentation("2008年北京Olympic Games") == ["2008", "年", "北", "京", "olympic", "games"]
    # CMRC punctuation: a segment of its own, or dropped (without splitting the run it sits in)
    assert mixed_segmentation("《红楼梦》，曹雪芹") == ["《", "红", "楼", "梦", "》", "，", "曹", "雪", "芹"]
    assert mixed_segmentation("《红楼梦》，曹雪芹", remove_punctuation=True) == ["红", "楼", "梦", "曹", "雪", "芹"]
    assert mixed_segmentation("covid-19", remove_punctuation=True) == ["covid19"]
    assert mixed_segmentation("U.S. army") == ["u", ".", "s", ".", "army"]


def test_longest_common_run():
    assert longest_common_run(list("abcde"), list("xbcdy")) == 3
    assert longest_common_run(list("abc"), list("xyz")) == 0
    assert longest_common_run([], list("abc")) == 0


def test_cmrc_exact_and_f1():
    assert cmrc_exact("《红楼梦》", "红楼梦") == 1  # CMRC punctuation removed before comparing
    assert cmrc_exact("踢爆", "踢爆。") == 1
    assert cmrc_exact("踢爆", "是踢爆") == 0
    assert cmrc_exact("Nexon", "nexon") == 1
    # gold 踢爆 (2 segments), prediction 即为踢爆 (4): common run 2 -> precision 0.5, recall 1
    assert cmrc_f1("踢爆", "即为踢爆") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert cmrc_f1("踢爆", "") == 0.0
    # 韩 国 nexon 公 司 against 由 nexon 公 司: common run of 3 -> precision 3/4, recall 3/5
    assert cmrc_f1("韩国Nexon公司", "由Nexon公司") == pytest.approx(2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5))
    ex = [QAExample("a", "q", "c", ("踢爆", "踢爆了")), QAExample("b", "q", "c", ("盛大游戏",))]
    m = cmrc_metrics(ex, {"a": "踢爆了", "b": "盛大"})
    assert m["exact"] == pytest.approx(50.0)
    assert m["f1"] == pytest.approx(100 * (1 + 2 * 1.0 * 0.5 / 1.5) / 2)
    assert m["average"] == pytest.approx((m["exact"] + m["f1"]) / 2)


@pytest.mark.parametrize("reply, lang, expected", [
    ("France", "en", "France"),
    ("The answer is: \"West Francia\"", "en", "West Francia"),
    ("The answer to this question is: 1000 years ago.", "en", "1000 years ago"),
    ("Answer: Rollo\nRollo was a Viking.", "en", "Rollo"),
    ("unanswerable", "en", ""),
    ("The answer is: Unanswerable", "en", ""),
    ("This is not mentioned in the context.", "en", ""),
    ("\n\n  Paris.  ", "en", "Paris"),
    ("U.S. Army", "en", "U.S. Army"),                     # a full stop inside is kept
    ("Anthony Mann", "en", "Anthony Mann"),               # a word starting with 'a' is not a lead-in
    ("答案：踢爆", "zh", "踢爆"),
    ("《红楼梦》", "zh", "红楼梦"),
    ("无法回答", "zh", ""),
    ("", "en", ""),
])
def test_extract_answer(reply, lang, expected):
    assert extract_answer(reply, lang) == expected
