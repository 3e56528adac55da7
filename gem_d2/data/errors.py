"""The errors of gem_d2's dataset readers (and of the converters in ``gem_d2.prepare``, which reuse them)."""
import os
from typing import Optional


class DatasetFormatError(ValueError):
    """A dataset file exists but its content is not what the reader expects (the message names the file)."""


class FileFormatError(DatasetFormatError):
    """A file's content is malformed; the message is ``file:line: what`` (``file: what`` when no line is known)."""

    def __init__(self, path, message: str, line: Optional[int] = None):
        self.path = os.fspath(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")
