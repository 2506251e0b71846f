"""infer-recipes: a PyTorch inference engine and optimization-recipe library for Llama-family models.

    from infer_recipes import LLM, SamplingParams
    llm = LLM("smollm2-135m-instruct", device="cpu", dtype="float32")
    llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0.0))[0].text
"""
from .config import Constraint, EngineConfig, SamplingParams
from .engine.llm import LLM
from .engine.request import RequestOutput
from .errors import InferRecipesError
from .optimizer import LLMInferenceOptimizer
from .recipe import Recipe, load_recipe

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "Constraint", "EngineConfig", "RequestOutput", "InferRecipesError", "LLMInferenceOptimizer",
           "Recipe", "load_recipe", "__version__"]
