"""The key tables of :mod:`gem_d2.model_zoo.convert`: reference DINO state-dict names -> GEMDINO names.

A rule is ``(regex, target)``; the first rule whose regex matches a whole source key applies. ``target``: a
``re`` template (``\\1``... the groups), a function ``(match, ctx) -> name`` (``ctx``: ``num_decoder_layers``,
``num_input_levels`` of the source), ``None`` (dropped on purpose) or ``(ALIAS, template)`` (the entry repeats
the named source entry: the same module registered twice; it is dropped after checking they are equal).
Names of the sources come from the references' model definitions (IDEA-Research/DINO at commit faa8520,
detrex at commit e244e6c); ``tests/fixtures/dino_reference_state_dicts.json`` lists them with their shapes.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, Tuple, Union

__all__ = ["FORMATS", "ALIAS", "IDEA_KEYS", "DETREX_KEYS", "MARKERS", "REFERENCE_SETTINGS"]

FORMATS = ("idea", "detrex")
ALIAS = "alias"  # a rule target (ALIAS, canonical): the entry repeats another entry of the source
_T = "dino.transformer."
Target = Union[None, str, Tuple[str, str], Callable[[re.Match, dict], str]]


def _neck_idea(m: re.Match, ctx: dict) -> str:
    level, n_in = int(m.group(1)), ctx["num_input_levels"]  # 1x1 input projections first, then 3x3 extra levels
    part = f"convs.{level}" if level < n_in else f"extra_convs.{level - n_in}"
    return f"dino.neck.{part}.{m.group(2)}.{m.group(3)}"


def _head_detrex(kind: str) -> Callable[[re.Match, dict], str]:
    def rename(m: re.Match, ctx: dict) -> str:  # detrex: entries 0..D-1 decode, entry D is the encoder's
        i, rest = int(m.group(1)), m.group(2)
        if i == ctx["num_decoder_layers"]:
            return f"{_T}enc_{kind}_head.{rest}"
        return f"{_T}decoder.{kind}_heads.{i}.{rest}"
    return rename


_TV_BN = r"(weight|bias|running_mean|running_var)"
_SRC_ENC, _SRC_DEC = r"transformer\.encoder\.layers\.(\d+)\.", r"transformer\.decoder\.layers\.(\d+)\."
_ENC, _DEC = _T + r"encoder.layers.\1.", _T + r"decoder.layers.\1."
_MHA = r"(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)"
IDEA_KEYS: Tuple[Tuple[str, Target], ...] = (
    (r".*\.num_batches_tracked", None),
    # torchvision ResNet-50 -> detectron2 ResNet: layerK is resK+1, bnJ is convJ.norm, downsample the shortcut
    (r"backbone\.0\.body\.conv1\.weight", "backbone.stem.conv1.weight"),
    (rf"backbone\.0\.body\.bn1\.{_TV_BN}", r"backbone.stem.conv1.norm.\1"),
    *((rf"backbone\.0\.body\.layer{k}\.(\d+)\.conv(\d)\.weight", rf"backbone.res{k + 1}.\1.conv\2.weight")
      for k in range(1, 5)),
    *((rf"backbone\.0\.body\.layer{k}\.(\d+)\.bn(\d)\.{_TV_BN}", rf"backbone.res{k + 1}.\1.conv\2.norm.\3")
      for k in range(1, 5)),
    *((rf"backbone\.0\.body\.layer{k}\.(\d+)\.downsample\.0\.weight", rf"backbone.res{k + 1}.\1.shortcut.weight")
      for k in range(1, 5)),
    *((rf"backbone\.0\.body\.layer{k}\.(\d+)\.downsample\.1\.{_TV_BN}", rf"backbone.res{k + 1}.\1.shortcut.norm.\2")
      for k in range(1, 5)),
    (r"input_proj\.(\d+)\.([01])\.(weight|bias)", _neck_idea),
    (r"transformer\.level_embed", _T + "level_embed"),
    (_SRC_ENC + r"self_attn\.(\w+)\.(weight|bias)", _ENC + r"self_attn.\2.\3"),
    (_SRC_ENC + r"(norm[12])\.(weight|bias)", _ENC + r"\2.\3"),
    (_SRC_ENC + r"(linear[12])\.(weight|bias)", _ENC + r"ffn.\2.\3"),
    (_SRC_DEC + r"self_attn\." + _MHA, _DEC + r"self_attn.\2"),
    (_SRC_DEC + r"cross_attn\.(\w+)\.(weight|bias)", _DEC + r"cross_attn.\2.\3"),
    # its decoder norms are named by module: norm2 follows self-attention, norm1 cross-attention
    (_SRC_DEC + r"norm2\.(weight|bias)", _DEC + r"norm1.\2"),
    (_SRC_DEC + r"norm1\.(weight|bias)", _DEC + r"norm2.\2"),
    (_SRC_DEC + r"norm3\.(weight|bias)", _DEC + r"norm3.\2"),
    (_SRC_DEC + r"(linear[12])\.(weight|bias)", _DEC + r"ffn.\2.\3"),
    (r"transformer\.decoder\.(norm|ref_point_head\.layers\.\d+)\.(weight|bias)", _T + r"decoder.\1.\2"),
    (r"transformer\.(tgt_embed|enc_output|enc_output_norm)\.(weight|bias)", _T + r"\1.\2"),
    (r"transformer\.enc_out_class_embed\.(weight|bias)", _T + r"enc_class_head.\1"),
    (r"transformer\.enc_out_bbox_embed\.layers\.(\d+)\.(weight|bias)", _T + r"enc_box_head.layers.\1.\2"),
    (r"transformer\.decoder\.((class|bbox)_embed\.\d+\..+)", (ALIAS, r"\1")),  # the detector's heads, again
    (r"class_embed\.(\d+)\.(weight|bias)", _T + r"decoder.class_heads.\1.\2"),
    (r"bbox_embed\.(\d+)\.layers\.(\d+)\.(weight|bias)", _T + r"decoder.box_heads.\1.layers.\2.\3"),
    (r"label_enc\.weight", "dino.label_enc.weight"),
)

DETREX_KEYS: Tuple[Tuple[str, Target], ...] = (
    (r".*\.num_batches_tracked", None),
    (r"(backbone\..+)", r"\1"),  # detectron2's ResNet on both sides
    (r"neck\.(convs|extra_convs)\.(\d+)\.conv\.(weight|bias)", r"dino.neck.\1.\2.0.\3"),
    (r"neck\.(convs|extra_convs)\.(\d+)\.norm\.(weight|bias)", r"dino.neck.\1.\2.1.\3"),
    (r"transformer\.level_embeds", _T + "level_embed"),
    (_SRC_ENC + r"attentions\.0\.(\w+)\.(weight|bias)", _ENC + r"self_attn.\2.\3"),
    (_SRC_ENC + r"norms\.0\.(weight|bias)", _ENC + r"norm1.\2"),
    (_SRC_ENC + r"norms\.1\.(weight|bias)", _ENC + r"norm2.\2"),
    (_SRC_ENC + r"ffns\.0\.layers\.0\.0\.(weight|bias)", _ENC + r"ffn.linear1.\2"),
    (_SRC_ENC + r"ffns\.0\.layers\.1\.(weight|bias)", _ENC + r"ffn.linear2.\2"),
    (_SRC_DEC + r"attentions\.0\.attn\." + _MHA, _DEC + r"self_attn.\2"),
    (_SRC_DEC + r"attentions\.1\.(\w+)\.(weight|bias)", _DEC + r"cross_attn.\2.\3"),
    (_SRC_DEC + r"norms\.0\.(weight|bias)", _DEC + r"norm1.\2"),
    (_SRC_DEC + r"norms\.1\.(weight|bias)", _DEC + r"norm2.\2"),
    (_SRC_DEC + r"norms\.2\.(weight|bias)", _DEC + r"norm3.\2"),
    (_SRC_DEC + r"ffns\.0\.layers\.0\.0\.(weight|bias)", _DEC + r"ffn.linear1.\2"),
    (_SRC_DEC + r"ffns\.0\.layers\.1\.(weight|bias)", _DEC + r"ffn.linear2.\2"),
    (r"transformer\.decoder\.(norm|ref_point_head\.layers\.\d+)\.(weight|bias)", _T + r"decoder.\1.\2"),
    (r"transformer\.(tgt_embed|enc_output|enc_output_norm)\.(weight|bias)", _T + r"\1.\2"),
    (r"transformer\.decoder\.((class|bbox)_embed\.\d+\..+)", (ALIAS, r"\1")),  # the detector's heads, again
    (r"class_embed\.(\d+)\.(weight|bias)", _head_detrex("class")),
    (r"bbox_embed\.(\d+)\.(layers\.\d+\.(?:weight|bias))", _head_detrex("box")),
    (r"label_enc\.weight", "dino.label_enc.weight"),
)

MARKERS = {"idea": "transformer.decoder.layers.0.cross_attn.sampling_offsets.weight",
            "detrex": "transformer.decoder.layers.0.attentions.1.sampling_offsets.weight"}

# Non-weight settings of each reference that the config must share for the weights to mean the same.
_COMMON = {"MODEL.DINO.PE_NORMALIZE": True, "MODEL.DINO.PE_SCALE": 6.283185307179586,
           "MODEL.DINO.QUERY_PE_TEMPERATURE": 10000, "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
           "MODEL.PIXEL_STD": [58.395, 57.12, 57.375], "INPUT.FORMAT": "RGB", "MODEL.RESNETS.DEPTH": 50,
           "MODEL.RESNETS.STRIDE_IN_1X1": False, "MODEL.RESNETS.NORM": "FrozenBN"}
REFERENCE_SETTINGS: Dict[str, Dict[str, object]] = {
    "idea": {"MODEL.DINO.PE_TEMPERATURE": 20, "MODEL.DINO.PE_OFFSET": 0.0, **_COMMON},
    "detrex": {"MODEL.DINO.PE_TEMPERATURE": 10000, "MODEL.DINO.PE_OFFSET": -0.5, **_COMMON},
}
