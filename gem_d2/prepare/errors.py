"""Errors raised while reading the original dataset releases."""
from gem_d2.data.errors import FileFormatError

# A source file exists but its content is malformed; the message names the file and, when known, the line.
# The data package's located error under the converters' name: the VOC XML reader the converters share with
# the loader (gem_d2.data.voc_xml) raises it, and the converters catch it as SourceFormatError.
SourceFormatError = FileFormatError


class MissingSourceError(FileNotFoundError):
    """A file or folder the converter needs is not in the source tree; the message says what is expected."""
