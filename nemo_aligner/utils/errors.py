"""Errors a user can act on that happen while a run is under way (not at start-up).

Entry points report them in one line and exit non-zero, like a bad config: a reward server
that went away, a reward function that raised or returned garbage. Checkpoints already
written stay as they are.
"""


class RunError(RuntimeError):
    """A failure during a run whose message says what went wrong and what to do."""
