"""The interface every converter implements, and the context it runs in."""
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Tuple

from gem_d2.data.uodb import UODB_DATASETS, UodbSpec
from gem_d2.prepare.errors import MissingSourceError
from gem_d2.prepare.records import SplitStats
from gem_d2.prepare.tree import VocTreeWriter

FolderSplit = Tuple[str, str]  # (output folder, split file name)


@dataclass
class Context:
    """What a conversion needs besides its source: the staging folder, how to place images, the progress bar."""

    stage: str
    link_mode: str = "hardlink"
    progress: Callable[..., Iterable] = lambda it, **kw: it
    dropped: Counter = field(default_factory=Counter)

    def writer(self, spec: UodbSpec, folder: str, keep_empty: bool = False) -> VocTreeWriter:
        """A VOC-layout writer for ``folder`` of dataset ``spec`` (its classes, extension and coordinate offset)."""
        return VocTreeWriter(os.path.join(self.stage, folder), spec.classes, spec.image_ext, spec.coordinate_offset,
                             self.link_mode, self.dropped, keep_empty=keep_empty)


class Converter:
    """Converts one original release (under ``<source>/<source_dir>``) into the UODB folders of dataset ``key``.

    Subclasses set ``key``, ``source_dir`` and ``expected`` (the source files, as documented for users) and
    implement :meth:`inputs` and :meth:`convert`.
    """

    key: str = ""
    source_dir: str = ""
    expected: str = ""

    @property
    def spec(self) -> UodbSpec:
        return UODB_DATASETS[self.key]

    @property
    def folders(self) -> List[str]:
        """The output folders of this dataset, in the order of the loader's spec."""
        return list(dict.fromkeys(folder for sources in self.spec.splits.values() for folder, _ in sources))

    def options(self) -> dict:
        """Conversion choices recorded in the manifest (a change re-runs the conversion)."""
        return {}

    def inputs(self, src: str) -> List[str]:
        """Every source file the conversion reads (fingerprinted); raises :class:`MissingSourceError` if absent."""
        raise NotImplementedError

    def convert(self, src: str, ctx: Context) -> Dict[FolderSplit, SplitStats]:
        """Write the dataset's folders into ``ctx.stage``; return the stats per (folder, split file)."""
        raise NotImplementedError

    def require(self, path: str, what: str) -> str:
        """``path`` if it exists, else a :class:`MissingSourceError` naming it and the expected source layout."""
        if not os.path.exists(path):
            raise MissingSourceError(f"{what} not found: {path}\nexpected source files: {self.expected}")
        return path


def folder_stats(folder: str, stats: Dict[str, SplitStats]) -> Dict[FolderSplit, SplitStats]:
    """Key a writer's per-split stats by ``(folder, split)``."""
    return {(folder, split): st for split, st in stats.items()}
