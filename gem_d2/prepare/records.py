"""Plain records shared by the converters: per-split counts and a dataset's conversion report.

The box record is the loader's and the XML writer's, :class:`gem_d2.data.voc_xml.VocBox`.
"""
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict


@dataclass
class SplitStats:
    """Images, boxes (of which difficult) and boxes per class of one split."""

    images: int = 0
    boxes: int = 0
    difficult: int = 0
    classes: Counter = field(default_factory=Counter)

    def add(self, other: "SplitStats") -> None:
        self.images += other.images
        self.boxes += other.boxes
        self.difficult += other.difficult
        self.classes.update(other.classes)

    def to_json(self) -> dict:
        return {"images": self.images, "boxes": self.boxes, "difficult": self.difficult,
                "classes": dict(sorted(self.classes.items()))}

    @classmethod
    def from_json(cls, d: dict) -> "SplitStats":
        return cls(int(d["images"]), int(d["boxes"]), int(d["difficult"]), Counter(d.get("classes", {})))


@dataclass
class DatasetReport:
    """What converting (or skipping) one dataset produced: stats per UODB split and what was dropped, by reason."""

    key: str
    splits: Dict[str, SplitStats] = field(default_factory=dict)
    dropped: Counter = field(default_factory=Counter)
    skipped: bool = False  # True when an up-to-date conversion was found and nothing was written

    def to_json(self) -> dict:
        return {"splits": {s: st.to_json() for s, st in self.splits.items()},
                "dropped": dict(sorted(self.dropped.items()))}

    @classmethod
    def from_json(cls, key: str, d: dict, skipped: bool = False) -> "DatasetReport":
        return cls(key, {s: SplitStats.from_json(v) for s, v in d["splits"].items()}, Counter(d.get("dropped", {})),
                   skipped)
