"""How many demonstrations the SQuAD prompt gets: SmolLM2-135M-Instruct fp32 on the first N questions of
dev-v2.0 part a with 0..3 shots, one model, one process (the figures behind `eval squad`'s default --shots 3).

    python benchmarks/prompt_shots.py 100 0 1 2 3
"""
import json
import sys

from infer_recipes import LLM
from infer_recipes.eval.qa import answer_questions, load_qa, report

ex = load_qa('../shared/data/squad/dev-v2.0.part-a.json', int(sys.argv[1]))
llm = LLM("smollm2-135m-instruct", progress=False)
for shots in map(int, sys.argv[2:]):
    res, sec = answer_questions(llm, ex, "en", shots, 16, 32, progress=False)
    r = report("squad", ex, res, sec)
    print(shots, json.dumps(r["metrics"]), "q/s %.2f unanswered %d gen %d" % (r["questions_per_s"], r["unanswered"],
                                                                              r["generated_tokens"]), flush=True)
