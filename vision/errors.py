"""The error raised when a data folder is missing or laid out differently than expected."""

from __future__ import annotations


class DataLayoutError(FileNotFoundError):
    """A data source is missing or not in the layout its loader reads.

    The message says which layout is expected, where the loader looked, and how
    to get the data, so the fix is in the error itself.
    """

    def __init__(self, dataset: str, expected: str, looked_in: str, how_to_get: str) -> None:
        self.dataset = dataset
        self.expected = expected
        self.looked_in = looked_in
        self.how_to_get = how_to_get
        super().__init__(
            f"{dataset}: data not found or not in the expected layout.\n"
            f"  expected: {expected}\n"
            f"  looked in: {looked_in}\n"
            f"  how to get it: {how_to_get}"
        )
