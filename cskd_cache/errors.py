"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class CacheError(Exception):
    """A problem the user can fix (bad flag, bad file, mismatched cache). Never shown as a traceback."""


class DataError(CacheError):
    """The dataset given with --data cannot be read as asked."""


class BadImageError(DataError):
    """One sample's image cannot be decoded; `key` names it so the user can find or skip it."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"cannot decode image {key!r}: {reason} (fix or remove it; precompute --skip-bad skips "
                         "such images)")
        self.key = key
