"""Import a DINO checkpoint of a reference implementation into gem-d2's GEMDINO layout.

Sources (ResNet-50, 4 scales; 5 scales map too):

- ``idea``: IDEA-Research/DINO. A file ``{"model": state_dict, "args": Namespace, ...}`` (the Namespace is
  read as plain data). Class rows are COCO category ids 0..90 (``label_enc`` has one more row), the
  decoder's class/box heads are shared by default, the backbone is torchvision's ResNet.
- ``detrex``: detrex's DINO. ``{"model": state_dict, ...}`` with detectron2's ResNet and its 80 contiguous
  COCO classes; one class/box head per decoder layer plus the encoder's as the last entry.

Every source entry is renamed by the tables :data:`IDEA_KEYS` / :data:`DETREX_KEYS` (first full match wins)
or dropped on purpose (aliases of other entries, which must then be equal to them, and BatchNorm counters);
an entry no rule matches is an error. Then, against the state dict of a freshly built GEMDINO (``target``):

- tensors must have the target's shape (an error names both keys, both shapes and the config key to change);
- class-row tensors (class heads, ``label_enc``) copy the source row of each target class whose name matches a
  COCO name (case, spaces, ``_`` and ``-`` ignored; ``aliases`` map target names to COCO names), or, with
  ``match="index"``, row ``i`` from row ``i``; other rows keep the target's initialisation, i.e. as DINO
  initialises them (class weights ``nn.Linear``'s default, bias the focal prior, ``label_enc`` normal);
- a dense FFN of the source that is an MoE layer in the target fills every expert (sparse upcycling); the
  router keeps its initialisation;
- every target entry must be filled, except the routers' and the dataset classifier's (kept as initialised).

The config must also match the source's non-weight settings (:data:`REFERENCE_SETTINGS`, checked by
:func:`config_mismatches`): e.g. IDEA-Research/DINO's map position embedding has temperature 20 and no offset.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from gem_d2.model_zoo.reference_keys import ALIAS, DETREX_KEYS, FORMATS, IDEA_KEYS, MARKERS, REFERENCE_SETTINGS

__all__ = ["FORMATS", "IDEA_KEYS", "DETREX_KEYS", "REFERENCE_SETTINGS", "ConversionReport", "coco_class_names",
           "load_reference_checkpoint", "checkpoint_state_dict", "detect_format", "map_key", "class_row_map",
           "convert_state_dict", "upcycle_dense_ffns", "config_mismatches", "target_class_names",
           "VOC_COCO_ALIASES", "convert_checkpoint_file"]

TABLES = {"idea": IDEA_KEYS, "detrex": DETREX_KEYS}
_CLASS_ROWS = re.compile(r"(decoder\.class_heads\.\d+\.(weight|bias)|enc_class_head\.(weight|bias)|label_enc\.weight)$")
_MAY_KEEP_INIT = re.compile(r"(\.ffn\.router\.|^dataset_classifier\.)")
_FFN = re.compile(r"^(.*\.ffn)\.linear([12])\.(weight|bias)$")
_HINTS = (("tgt_embed", "MODEL.DINO.NUM_QUERIES"), ("level_embed", "MODEL.DINO.NUM_FEATURE_LEVELS"),
          ("linear", "MODEL.DINO.DIM_FEEDFORWARD"), ("sampling_offsets", "MODEL.DINO.NHEADS / NUM_FEATURE_LEVELS / "
          "*_N_POINTS"), ("attention_weights", "MODEL.DINO.NHEADS / NUM_FEATURE_LEVELS / *_N_POINTS"),
          ("backbone", "MODEL.RESNETS.*"), ("neck", "MODEL.DINO.IN_FEATURES / MODEL.RESNETS.OUT_FEATURES"))


@dataclass
class ConversionReport:
    """What :func:`convert_state_dict` did."""

    format: str
    copied: Dict[str, str] = field(default_factory=dict)  # target key <- source key
    dropped: List[str] = field(default_factory=list)  # source keys dropped on purpose
    kept_init: List[str] = field(default_factory=list)  # target keys left as initialised
    upcycled: List[str] = field(default_factory=list)  # MoE layers whose experts are copies of the dense FFN
    class_rows: Dict[int, int] = field(default_factory=dict)  # target row <- source row
    unmatched_classes: List[str] = field(default_factory=list)  # target class names without a source row

    def summary(self) -> str:
        return (f"{self.format} checkpoint: {len(self.copied)} entries copied, {len(self.dropped)} dropped "
                f"(aliases, BN counters), {len(self.kept_init)} target entries as initialised (routers, dataset "
                f"classifier); class rows copied for {len(self.class_rows)} target classes, "
                f"{len(self.unmatched_classes)} initialised as DINO does ({', '.join(self.unmatched_classes[:8])}"
                f"{', ...' if len(self.unmatched_classes) > 8 else ''}); experts upcycled in "
                f"{self.upcycled or 'no layer'}")


def coco_class_names(fmt: str) -> List[Optional[str]]:
    """Class name of each class row of a ``fmt`` checkpoint: COCO ids 0..90 (None = unused id) or 80 contiguous."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    things = sorted((c["id"], c["name"]) for c in COCO_CATEGORIES if c["isthing"])
    if fmt == "detrex":
        return [name for _, name in things]
    names: List[Optional[str]] = [None] * (things[-1][0] + 1)
    for i, name in things:
        names[i] = name
    return names


def load_reference_checkpoint(path) -> Dict[str, Tensor]:
    """The state dict of a reference checkpoint file, read as data (``weights_only``; ``args`` Namespace allowed)."""
    from gem_d2.utils.safe_load import load_torch_file

    return checkpoint_state_dict(load_torch_file(path, safe_globals=[argparse.Namespace]))


def checkpoint_state_dict(obj) -> Dict[str, Tensor]:
    """``obj["model"]`` when present (else ``obj``), tensors only, without a DDP ``module.`` prefix."""
    state = obj.get("model", obj) if isinstance(obj, Mapping) else obj
    if not isinstance(state, Mapping) or not any(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"not a checkpoint: expected a state dict of tensors (or {{'model': state dict}}), got "
                         f"{type(state).__name__} with keys {list(state)[:5] if isinstance(state, Mapping) else ''}")
    state = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def detect_format(state: Mapping[str, Tensor]) -> str:
    """``"idea"`` or ``"detrex"`` from marker entries; a clear error for gem-d2 or unknown checkpoints."""
    found = [fmt for fmt, key in MARKERS.items() if key in state]
    if len(found) == 1:
        return found[0]
    if any(k.startswith("dino.transformer.") for k in state):
        raise ValueError("this is already a gem-d2 checkpoint (dino.transformer.* entries): load it directly")
    raise ValueError(f"unknown checkpoint format: expected IDEA-Research/DINO's (has {MARKERS['idea']!r}) or "
                     f"detrex's DINO (has {MARKERS['detrex']!r}); its first entries are {sorted(state)[:5]}")


def _context(state: Mapping[str, Tensor]) -> dict:
    layers = {int(m.group(1)) for k in state for m in [re.match(r"transformer\.decoder\.layers\.(\d+)\.", k)] if m}
    inputs = [k for k in state if re.fullmatch(r"input_proj\.\d+\.0\.weight", k) and state[k].shape[-1] == 1]
    return {"num_decoder_layers": len(layers), "num_input_levels": len(inputs)}


def map_key(fmt: str, key: str, ctx: Optional[dict] = None) -> Union[None, str, Tuple[str, str]]:
    """GEMDINO name of source entry ``key`` of a ``fmt`` checkpoint: a str, None (dropped) or ``(ALIAS,
    canonical source key)``. ``ctx``: ``num_decoder_layers`` (detrex heads) and ``num_input_levels`` (idea neck).
    Raises KeyError when no rule matches."""
    if fmt not in TABLES:
        raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")
    ctx = ctx or {"num_decoder_layers": 6, "num_input_levels": 3}
    for pattern, target in TABLES[fmt]:
        m = re.fullmatch(pattern, key)
        if m is None:
            continue
        if target is None:
            return None
        if isinstance(target, tuple):
            return (ALIAS, m.expand(target[1]))
        return target(m, ctx) if callable(target) else m.expand(target)
    raise KeyError(f"{fmt} checkpoint entry {key!r} matches no rule of the key table: not a DINO R-50 checkpoint "
                   f"of that implementation, or a variant the table does not cover")


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.lower())


def class_row_map(source_names: Sequence[Optional[str]], target_names: Sequence[Optional[str]], match: str = "name",
                  aliases: Optional[Mapping[str, str]] = None) -> Dict[int, int]:
    """``{target row: source row}``: by normalised name (``aliases``: target name -> source name) or, with
    ``match="index"``, row i from row i for every row both have (``target_names`` then only counts rows)."""
    if match == "index":
        return {i: i for i in range(min(len(source_names), len(target_names)))}
    if match != "name":
        raise ValueError(f"class match must be 'name' or 'index', got {match!r}")
    aliases = {_norm(k): _norm(v) for k, v in (aliases or {}).items()}
    rows = {_norm(n): i for i, n in enumerate(source_names) if n}
    out = {}
    for t, name in enumerate(target_names):
        if name:
            key = aliases.get(_norm(name), _norm(name))
            if key in rows:
                out[t] = rows[key]
    return out


def _shape_error(src_key: str, dst_key: str, src: Tensor, dst: Tensor) -> ValueError:
    hint = next((h for part, h in _HINTS if part in dst_key), "the MODEL.DINO / MODEL.RESNETS keys")
    return ValueError(f"shape mismatch: checkpoint {src_key!r} {tuple(src.shape)} -> model {dst_key!r} "
                      f"{tuple(dst.shape)}; the config does not describe this checkpoint's model (check {hint})")


def _experts_for(key: str, target: Mapping[str, Tensor]) -> Optional[str]:
    """The expert-bank entry of ``target`` that dense FFN entry ``key`` fills, or None."""
    m = _FFN.match(key)
    if m is None:
        return None
    name = f"{m.group(1)}.experts.{'w' if m.group(3) == 'weight' else 'b'}{m.group(2)}"
    return name if name in target else None


def _copies(key: str, value: Tensor, experts: str, target: Mapping[str, Tensor]) -> Tensor:
    bank = target[experts]
    if value.shape != bank.shape[1:]:
        raise _shape_error(key, experts, value, bank[0])
    return value.detach().to(bank.dtype)[None].expand_as(bank).clone()


def upcycle_dense_ffns(state: Mapping[str, Tensor], target: Mapping[str, Tensor]
                       ) -> Tuple[Dict[str, Tensor], List[str]]:
    """Sparse upcycling of a gem-d2 state: dense FFN entries (``*.ffn.linear{1,2}.*``) of layers that are MoE
    layers in ``target`` fill every expert of the bank (each a copy). Returns the new state (other entries as
    they are; the routers' are absent) and the upcycled layers' ``*.ffn`` names."""
    out, layers = {}, set()
    for key, value in state.items():
        experts = None if key in target else _experts_for(key, target)
        if experts is None:
            out[key] = value
        else:
            out[experts] = _copies(key, value, experts, target)
            layers.add(key.rsplit(".", 2)[0])
    return out, sorted(layers)


def convert_state_dict(source: Mapping, target: Mapping[str, Tensor], fmt: str = "auto",
                       target_class_names: Optional[Sequence[Optional[str]]] = None, match: str = "name",
                       aliases: Optional[Mapping[str, str]] = None,
                       source_class_names: Optional[Sequence[Optional[str]]] = None
                       ) -> Tuple[Dict[str, Tensor], ConversionReport]:
    """Convert a reference checkpoint (state dict or ``{"model": ...}``) to GEMDINO entries (module doc).

    Args:
        source: the reference checkpoint.
        target: ``GEMDINO.state_dict()`` of the model to fill (freshly built: its values are the initialisation).
        fmt: ``"idea"``, ``"detrex"`` or ``"auto"``.
        target_class_names: name of each target class row (None for rows without one); needed for ``match="name"``.
        match, aliases: class-row matching (see :func:`class_row_map`).
        source_class_names: names of the source rows; default COCO's as the reference lays them out.
    Returns:
        ``(state dict with exactly the target's entries, report)``; entries copied whole may share memory
        with ``source``.
    """
    state = checkpoint_state_dict(source)
    fmt = detect_format(state) if fmt == "auto" else fmt
    ctx = _context(state)
    report = ConversionReport(fmt)
    renamed: Dict[str, Tuple[str, Tensor]] = {}
    for key, value in state.items():
        new = map_key(fmt, key, ctx)
        if new is None or isinstance(new, tuple):
            if isinstance(new, tuple) and not (new[1] in state and torch.equal(state[new[1]], value)):
                raise ValueError(f"{key!r} should repeat {new[1]!r} (the same module under two names) but differs")
            report.dropped.append(key)
        elif new in renamed:
            raise ValueError(f"checkpoint entries {renamed[new][0]!r} and {key!r} both map to {new!r}")
        else:
            renamed[new] = (key, value)
    if match == "name" and target_class_names is None:
        raise ValueError("target_class_names is needed to match class rows by name (or use match='index')")
    if target_class_names is None:  # match by index: the model's class rows, unnamed
        target_class_names = [None] * next((v.shape[0] for k, v in target.items() if _CLASS_ROWS.search(k)), 0)
    rows = class_row_map(source_class_names or coco_class_names(fmt), target_class_names, match, aliases)
    report.class_rows = rows
    report.unmatched_classes = [str(n) for t, n in enumerate(target_class_names) if n and t not in rows]

    names = source_class_names or coco_class_names(fmt)
    out: Dict[str, Tensor] = {}
    absent, upcycled = [], set()
    for new, (key, value) in renamed.items():
        if new not in target:
            experts = _experts_for(new, target)
            if experts is None:
                absent.append(f"{key} -> {new}")
            else:  # a dense FFN of the checkpoint, an MoE layer of the model: every expert a copy
                out[experts] = _copies(key, value, experts, target)
                report.copied[experts] = key
                upcycled.add(new.rsplit(".", 2)[0])
            continue
        dst = target[new]
        if _CLASS_ROWS.search(new):
            out[new] = dst.detach().clone()  # rows without a source keep the model's initialisation
            _copy_rows(key, value, new, dst, out[new], rows, len(names) if match == "name" else None)
        elif value.shape != dst.shape:
            raise _shape_error(key, new, value, dst)
        else:
            out[new] = value.detach().to(dst.dtype)  # may share memory with the source (no copy of ~50M floats)
        report.copied[new] = key
    if absent:
        raise ValueError(f"{len(absent)} checkpoint entries have no place in the model (fewer layers or levels "
                         f"than the checkpoint?): {absent[:5]}")
    report.upcycled = sorted(upcycled)
    missing = [k for k in target if k not in report.copied and not _MAY_KEEP_INIT.search(k)]
    if missing:
        raise ValueError(f"the checkpoint has nothing for {len(missing)} model entries (more layers or levels than "
                         f"the checkpoint?): {missing[:5]}")
    report.kept_init = sorted(k for k in target if k not in report.copied)
    out.update((k, target[k].detach().clone()) for k in report.kept_init)
    _check_shared(target, out)
    return {k: out[k] for k in target}, report


def _copy_rows(key: str, value: Tensor, new: str, dst: Tensor, out: Tensor, rows: Mapping[int, int],
               num_named: Optional[int]) -> None:
    """Copy the mapped class rows of ``value`` into ``out`` (a copy of the target's ``dst``)."""
    if value.shape[1:] != dst.shape[1:]:
        raise _shape_error(key, new, value, dst)
    # the class heads must have exactly the named rows; label_enc may have more (IDEA-Research/DINO: one more)
    if num_named is not None and (value.shape[0] < num_named or (value.shape[0] != num_named and
                                                                  not new.endswith("label_enc.weight"))):
        raise ValueError(f"{key!r} has {value.shape[0]} class rows but the source's class names number {num_named}: "
                         f"not COCO's layout of this reference; pass source_class_names or match by index")
    for t, s in rows.items():
        if t >= dst.shape[0] or s >= value.shape[0]:
            raise ValueError(f"class row {s} of {key!r} ({value.shape[0]} rows) -> row {t} of {new!r} "
                             f"({dst.shape[0]} rows): out of range")
        out[t] = value[s].to(dst.dtype)


def _check_shared(target: Mapping[str, Tensor], out: Mapping[str, Tensor]) -> None:
    """Entries that are one tensor in the target (shared heads) must receive one value."""
    groups: Dict[int, List[str]] = {}
    for k, v in target.items():
        groups.setdefault(v.data_ptr(), []).append(k)
    for keys in groups.values():
        if len(keys) > 1 and any(not torch.equal(out[keys[0]], out[k]) for k in keys[1:]):
            raise ValueError(f"the model shares {keys[0]!r} with {keys[1:]} but the checkpoint has different "
                             f"values for them: set MODEL.DINO.SHARE_CLASS_HEAD / SHARE_BOX_HEAD False")


def config_mismatches(cfg, fmt: str) -> List[str]:
    """The config keys whose values differ from what the ``fmt`` reference computes with (one line each)."""
    lines = []
    for dotted, expected in REFERENCE_SETTINGS[fmt].items():
        node = cfg
        for part in dotted.split("."):
            node = node[part]
        same = (list(node) == list(expected) if isinstance(expected, list) else
                abs(float(node) - float(expected)) < 1e-9 if isinstance(expected, (int, float)) and
                not isinstance(expected, bool) else node == expected)
        if not same:
            lines.append(f"{dotted} is {node!r}; the {fmt} reference uses {expected!r}")
    return lines


def target_class_names(cfg, num_rows: int) -> Optional[List[Optional[str]]]:
    """Local class name of each class row of the model ``cfg`` builds (its label space's), or None without one."""
    if not cfg.DATASETS.TRAIN:
        return None
    from gem_d2.data.label_space import UnifiedLabelSpace

    space = UnifiedLabelSpace.from_cfg(cfg)
    names: List[Optional[str]] = [c for i in range(len(space)) for c in space.classes(i)]
    return names + [None] * (num_rows - len(names))


# VOC's names of COCO classes (VOC-style datasets: VOC, Clipart, Watercolor, Comic); pass as ``aliases``.
VOC_COCO_ALIASES = {"aeroplane": "airplane", "motorbike": "motorcycle", "sofa": "couch", "tvmonitor": "tv"}


def convert_checkpoint_file(path, cfg, fmt: str = "auto", match: str = "name",
                            aliases: Optional[Mapping[str, str]] = None
                            ) -> Tuple[Dict[str, Tensor], ConversionReport, List[str]]:
    """Read the reference checkpoint ``path``, build ``cfg``'s GEMDINO on the CPU (seeded with ``cfg.SEED``, or 0:
    its fresh values initialise what the checkpoint lacks) and convert into it.

    Returns:
        ``(state dict, report, config mismatches)`` (see :func:`convert_state_dict`, :func:`config_mismatches`).
    """
    from detectron2.modeling import build_model

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    state = load_reference_checkpoint(path)
    fmt = detect_format(state) if fmt == "auto" else fmt
    torch.manual_seed(cfg.SEED if cfg.SEED >= 0 else 0)
    model = build_model(cfg)
    names = target_class_names(cfg, model.num_classes) if match == "name" else None
    if match == "name" and names is None:
        raise ValueError("the config has no DATASETS.TRAIN, so its class rows have no names to match: set the "
                         "datasets, or match class rows by index")
    out, report = convert_state_dict(state, model.state_dict(), fmt, names, match, aliases)
    return out, report, config_mismatches(cfg, fmt)
