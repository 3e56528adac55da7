"""Deterministic train/test assignment for datasets whose UODB split lists are not public."""
import hashlib
from typing import Dict, Set


def _rank(salt: str, group: str) -> str:
    return hashlib.sha1(f"{salt}\0{group}".encode()).hexdigest()


def hash_split(group_sizes: Dict[str, int], test_fraction: float, salt: str) -> Set[str]:
    """Pick the test groups: groups in the order of ``sha1(salt, group)`` until ``test_fraction`` of the images.

    Whole groups (a video, a scene, a folder) go to one side, so near-duplicate frames never straddle the split.
    The result depends only on the group names and sizes, not on file order. With two or more groups, both
    sides get at least one group.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    groups = sorted(group_sizes, key=lambda g: (_rank(salt, g), g))
    if len(groups) < 2:
        return set()
    total = sum(group_sizes.values())
    test, count = set(), 0
    for g in groups[:-1]:  # the last group always stays on the training side
        if test and count >= test_fraction * total:
            break
        test.add(g)
        count += group_sizes[g]
    return test
