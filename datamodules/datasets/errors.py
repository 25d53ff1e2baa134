"""The error every dataset reader raises when its files are not where the suite expects them.

In its own module so that the readers (voc.py, ade20k.py, ...) and the package's locators share
one class without importing each other.
"""


class DatasetMissing(RuntimeError):
    """The dataset is not where the suite expects it (or is incomplete); the message, one line,
    names the missing piece and says how to get it."""
