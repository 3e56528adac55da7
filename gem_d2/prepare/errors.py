"""Errors raised while reading the original dataset releases."""
import os
from typing import Optional

from gem_d2.data.voc import DatasetFormatError


class SourceFormatError(DatasetFormatError):
    """A source file exists but its content is malformed; the message names the file and, when known, the line."""

    def __init__(self, path, message: str, line: Optional[int] = None):
        self.path = os.fspath(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class MissingSourceError(FileNotFoundError):
    """A file or folder the converter needs is not in the source tree; the message says what is expected."""
