"""User-facing errors: one line that names the problem and the fix.

The CLI prints these without a traceback and exits with status 2; library users catch `InferRecipesError`.
"""


class InferRecipesError(Exception):
    """Bad input or an unavailable resource, explained in one line."""


class ModelSourceError(InferRecipesError):
    """A model path, alias or file that cannot be loaded."""


class ContextLengthError(InferRecipesError):
    """A prompt that does not fit in the model's context window."""

    def __init__(self, prompt_tokens: int, max_model_len: int):
        self.prompt_tokens = prompt_tokens
        self.max_model_len = max_model_len
        super().__init__(
            f"prompt has {prompt_tokens} tokens but the model's context is {max_model_len} tokens "
            f"(it must leave room for at least one new token): shorten the prompt"
        )
