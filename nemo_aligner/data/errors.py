"""The exception raised for bad training data."""


class DataError(ValueError):
    """A problem in a user's data file.

    The message is one line, ``"{path}:{line_no}: {what is wrong}; {how to fix}"``, so the
    user can jump to the line. Subclasses ``ValueError`` so generic handlers still catch it.
    """
