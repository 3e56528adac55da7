"""Reading the CSV annotation files of the original releases (LISA, DeepLesion) with line-numbered errors."""
from __future__ import annotations

import csv
from typing import Iterator, List, Sequence, Tuple

from gem_d2.prepare.errors import SourceFormatError


def csv_rows(path, columns: Sequence[str], delimiter: str = ",") -> Iterator[Tuple[int, List[str]]]:
    """Yield ``(line number, [stripped value of each of columns])`` per non-blank row of ``path``.

    The first line must be a header holding every name in ``columns`` (a UTF-8 BOM is tolerated);
    a missing header or column, or a row with fewer fields than the header, raises
    :class:`SourceFormatError` naming the file and line.
    """
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise SourceFormatError(path, "empty file: expected a header line", 1)
        header = [h.strip() for h in header]
        missing = [c for c in columns if c not in header]
        if missing:
            raise SourceFormatError(path, f"header lacks column(s) {missing}; got {header}", 1)
        index = [header.index(c) for c in columns]
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < len(header):
                raise SourceFormatError(path, f"expected {len(header)} {delimiter!r}-separated fields, got {len(row)}",
                                        reader.line_num)
            yield reader.line_num, [row[i].strip() for i in index]
