"""The engine's one exception type for problems users can cause (bad checkpoints, prompts, params)."""


class EngineError(Exception):
    """A problem the user can fix; the message names the file, key or value and what to do."""
