"""Errors with one-line messages that say what is wrong and what to do."""


class NessoError(Exception):
    """Base class: the message is a single line meant for the user."""


class ConfigError(NessoError):
    """config.json (or generation_config.json) is missing, unreadable or inconsistent."""


class WeightsError(NessoError):
    """Weight files are missing, truncated, corrupt or do not match the config."""


class HubError(NessoError):
    """A model could not be found locally or downloaded from the Hugging Face Hub."""


class TokenizerError(NessoError):
    """The tokenizer or chat template could not be loaded or applied."""


class ContextLengthError(NessoError):
    """A prompt does not fit in the model's context window."""


class ToolError(Exception):
    """Raised by a tool to give the model an error result: `error: <message>` (no exception type).

    Not a NessoError: it is the tool's answer to the model, not a failure of nesso-mlx."""
