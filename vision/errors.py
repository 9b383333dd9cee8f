"""The errors raised when a data folder is missing, laid out differently than expected, or unsafe to read."""

from __future__ import annotations

import os
import pickle


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


class UnsafePickleError(pickle.UnpicklingError):
    """A data file is a pickle that names a global its loader does not admit.

    Raised before the global is called: nothing the file asked for has run.
    """

    def __init__(self, dataset: str, path: str, refused: str) -> None:
        self.dataset = dataset
        self.path = path
        self.refused = refused
        super().__init__(
            f"{dataset}: refused to unpickle {os.path.abspath(path)}: it names the global {refused!r}, which a "
            f"{dataset} batch never contains (only numpy arrays, lists, ints and bytes). Nothing from the file "
            "was run. It is not a genuine batch file: replace it with one from the original release."
        )
