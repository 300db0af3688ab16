"""User-facing errors: the CLI prints their message instead of a traceback."""


class SpecstreamError(ValueError):
    """Base class of every error a user can fix (bad path, bad config, bad input); a
    ValueError, so callers that catch bad values catch these too."""


class ModelLoadError(SpecstreamError):
    """A model folder is missing, incomplete, corrupt or of an unsupported type."""


class ConversionError(SpecstreamError):
    """A checkpoint cannot be converted (bad file, unknown tensor, unsupported format)."""


class InputError(SpecstreamError):
    """A generation request is invalid (empty prompt, max_tokens <= 0, too long)."""
