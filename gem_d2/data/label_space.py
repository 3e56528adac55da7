"""The unified label space: every training dataset's classes concatenated into disjoint blocks.

For datasets ``[A (3 classes), B (2 classes)]`` the space has 5 classes, A's block is ``[0, 3)`` and B's
``[3, 5)``; A's local class 1 is unified class 1, B's local class 1 is unified class 4. Blocks follow the
order of ``DATASETS.TRAIN``. A block belongs to a *domain* (metadata ``domain``; by default the dataset name
without its split suffix), so a test dataset uses the block of the training dataset of its domain
(``uodb_kitti_val`` uses ``uodb_kitti_train``'s). Few-shot adaptation appends a block: ``extended_with``.
"""
from typing import List, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from gem_d2.data.catalog import UnknownDatasetError, dataset_domain, require_registered
from gem_d2.utils.checks import check_index_range


def dataset_classes(name: str) -> List[str]:
    """``thing_classes`` of a registered dataset (a COCO-JSON dataset registered without them is read once)."""
    require_registered(name)
    meta = MetadataCatalog.get(name)
    classes = meta.get("thing_classes")
    if classes is None:
        DatasetCatalog.get(name)  # load_coco_json sets thing_classes
        classes = meta.get("thing_classes")
    if not classes:
        raise ValueError(f"dataset '{name}' has no 'thing_classes' metadata: register it with gem_d2.data."
                         f"register_voc_dataset / register_coco_dataset or set MetadataCatalog.get(name).thing_classes")
    return list(classes)


class UnifiedLabelSpace:
    """Disjoint class blocks of the given training datasets, in order (deterministic).

    Attributes:
        dataset_names: the training datasets, one per block.
        domains: their domains (what test datasets are matched by).
        offsets: start of each block; ``offsets[i + 1] - offsets[i]`` = classes of dataset i.
        num_classes: total number of classes.
        class_names: unified names ``"<domain>:<class>"``.
        signature: ``"|"``-joined domains (identifies the space).
    """

    def __init__(self, dataset_names: Sequence[str]):
        if isinstance(dataset_names, str):
            dataset_names = [dataset_names]
        names = list(dataset_names)
        if not names:
            raise ValueError("UnifiedLabelSpace needs at least one training dataset (DATASETS.TRAIN is empty)")
        if len(set(names)) != len(names):
            raise ValueError(f"UnifiedLabelSpace: a dataset is listed twice in {names}")
        domains = [dataset_domain(n) for n in names]
        for i, d in enumerate(domains):
            if d in domains[:i]:
                raise ValueError(f"datasets '{names[domains.index(d)]}' and '{names[i]}' are both of domain '{d}': "
                                 f"register them as one dataset (e.g. register_voc_sources) or give distinct domains")
        self.dataset_names: Tuple[str, ...] = tuple(names)
        self.domains: Tuple[str, ...] = tuple(domains)
        self._classes: Tuple[Tuple[str, ...], ...] = tuple(tuple(dataset_classes(n)) for n in names)
        offsets, total = [], 0
        for c in self._classes:
            offsets.append(total)
            total += len(c)
        self.offsets: Tuple[int, ...] = tuple(offsets)
        self.num_classes: int = total
        self.class_names: Tuple[str, ...] = tuple(f"{d}:{c}" for d, cs in zip(domains, self._classes) for c in cs)
        self.signature: str = "|".join(domains)

    # ------------------------------------------------------------------------------------------------ lookup
    def __len__(self) -> int:
        return len(self.dataset_names)

    def block(self, index: int) -> Tuple[int, int]:
        """``(start, stop)`` of block ``index`` (stop exclusive)."""
        if not 0 <= index < len(self.dataset_names):
            raise IndexError(f"label-space block {index} out of range: {len(self.dataset_names)} datasets "
                             f"{list(self.dataset_names)}")
        return self.offsets[index], self.offsets[index] + len(self._classes[index])

    def classes(self, index: int) -> Tuple[str, ...]:
        """The local class names of block ``index``."""
        self.block(index)
        return self._classes[index]

    def dataset_index(self, name: str) -> int:
        """Block index of dataset ``name``: a training dataset, or any dataset of a training dataset's domain."""
        if name in self.dataset_names:
            return self.dataset_names.index(name)
        domain = dataset_domain(name)
        if domain not in self.domains:
            raise UnknownDatasetError(
                f"dataset '{name}' (domain '{domain}') is not in the label space: no dataset of its domain is in "
                f"DATASETS.TRAIN {list(self.dataset_names)} (domains {list(self.domains)})")
        index = self.domains.index(domain)
        classes = tuple(dataset_classes(name))
        if classes != self._classes[index]:
            raise ValueError(f"dataset '{name}' has classes {list(classes)} but the block of its domain '{domain}' "
                             f"(from '{self.dataset_names[index]}') has {list(self._classes[index])}")
        return index

    def block_of(self, name: str) -> Tuple[int, int]:
        """``(start, stop)`` of dataset ``name``'s block."""
        return self.block(self.dataset_index(name))

    def to_unified(self, index: int, local):
        """Unified id(s) of local class id(s) ``local`` (int, or integer tensor/array) of block ``index``."""
        start, stop = self.block(index)
        n = stop - start
        if isinstance(local, int):
            if not 0 <= local < n:
                raise ValueError(f"class id {local} out of range for '{self.dataset_names[index]}' ({n} classes)")
            return start + local
        check_index_range(local, n, f"class ids of '{self.dataset_names[index]}' ({n} classes)")
        return local + start

    def to_local(self, unified: int) -> Tuple[int, int]:
        """``(block index, local class id)`` of a unified class id."""
        if not 0 <= unified < self.num_classes:
            raise ValueError(f"unified class id {unified} out of range [0, {self.num_classes})")
        index = max(i for i, o in enumerate(self.offsets) if o <= unified)
        return index, unified - self.offsets[index]

    # -------------------------------------------------------------------------------------------- building
    def extended_with(self, name: str) -> "UnifiedLabelSpace":
        """A new label space with dataset ``name``'s block appended (few-shot adaptation to a new domain)."""
        return UnifiedLabelSpace(list(self.dataset_names) + [name])

    @classmethod
    def from_cfg(cls, cfg) -> "UnifiedLabelSpace":
        """The space of ``cfg.DATASETS.TRAIN``; every ``DATASETS.TEST`` dataset must belong to one of its domains.

        Records the blocks in the metadata of the train and test datasets (see module doc).
        """
        space = cls(list(cfg.DATASETS.TRAIN))
        for name in cfg.DATASETS.TEST:
            try:
                space.dataset_index(name)
            except UnknownDatasetError as e:
                raise UnknownDatasetError(f"DATASETS.TEST has '{name}', which no dataset of DATASETS.TRAIN covers: "
                                          f"{e}") from None
        return space

    def to_dict(self) -> dict:
        """A plain description (datasets, domains, class names, offsets) for configs, logs and checkpoints."""
        return {"datasets": list(self.dataset_names), "domains": list(self.domains),
                "classes": [list(c) for c in self._classes], "offsets": list(self.offsets),
                "num_classes": self.num_classes}

    def __eq__(self, other) -> bool:
        return isinstance(other, UnifiedLabelSpace) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.dataset_names, self.signature, self.num_classes))

    def __repr__(self) -> str:
        blocks = ", ".join(f"{n}[{a}:{b}]" for n, (a, b) in zip(self.dataset_names, map(self.block, range(len(self)))))
        return f"UnifiedLabelSpace({self.num_classes} classes: {blocks})"
