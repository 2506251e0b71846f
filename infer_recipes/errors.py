"""User-facing errors: one line that names the problem and the fix.

The CLI prints these without a traceback and exits with status 2; library users catch `InferRecipesError`.
"""


class InferRecipesError(Exception):
    """Bad input or an unavailable resource, explained in one line."""


class ModelSourceError(InferRecipesError):
    """A model path, alias or file that cannot be loaded."""


class ContextLengthError(InferRecipesError):
    """A prompt that does not fit in the model's context window."""

    def __init__(self, prompt_tokens: int, max_model_len: int, characters: int | None = None):
        self.prompt_tokens, self.max_model_len, self.characters = prompt_tokens, max_model_len, characters
        super().__init__(f"prompt has {self._size()} but the model's context is {max_model_len} tokens (it must "
                         f"leave room for at least one new token): shorten the prompt")

    def _size(self) -> str:
        if self.characters is not None:  # refused before tokenizing: too long whatever its tokens
            return f"{self.characters} characters (at least {self.prompt_tokens} tokens)"
        return f"{self.prompt_tokens} tokens"

    def api_message(self) -> str:
        return (f"the request exceeds the available context size: the prompt has {self._size()} and the context "
                f"is {self.max_model_len} tokens (one must be left to generate); shorten the prompt")
