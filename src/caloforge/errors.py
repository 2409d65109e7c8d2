"""User-facing errors.

Every problem a user can cause (a bad file, an invalid option, an energy outside a model's
range) is raised as a :class:`CaloforgeError`. The CLI prints its message on one line and
exits non-zero without a traceback; anything else escaping is a bug in caloforge.
"""

from __future__ import annotations

import os


class CaloforgeError(Exception):
    """A problem with the user's input, described in one self-contained sentence."""


class ShowerFileError(CaloforgeError):
    """A shower file that cannot be read or does not match what is expected.

    The message always starts with the file's path so that a user handling many files
    knows which one is wrong.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class GeometryError(CaloforgeError):
    """An unknown geometry name or a malformed binning description."""


class OptionError(CaloforgeError):
    """An invalid command-line option or API argument."""
