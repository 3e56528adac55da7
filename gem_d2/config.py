"""gem_d2's configuration keys: ``add_gem_config(cfg)`` adds every new key with its default.

Defaults are DINO-4scale R50 as in its paper/reference code (see configs/Base-GEM-DINO.yaml) and
the GEM method of docs/design/. Only ``from_config`` methods and the engine read these keys.
"""
from detectron2.config import CfgNode as CN


def add_gem_config(cfg: CN) -> CN:
    """Add gem_d2's keys (with defaults) to a detectron2 config in place; returns it. Idempotent."""
    if "GEM" in cfg.MODEL:
        return cfg
    _add_dino(cfg)
    _add_gem(cfg)
    _add_data(cfg)
    _add_solver_test(cfg)
    _add_mobilenet(cfg)
    return cfg


# ---- MODEL.MOBILENET: build_mobilenet_v2_backbone (gem_d2/modeling/backbone/mobilenet.py, docs/backbones.md);
# its freezing is detectron2's MODEL.BACKBONE.FREEZE_AT (0 none, 1 stem, 2 stem + res2, ..., 5 all stages).
def _add_mobilenet(cfg: CN) -> None:
    cfg.MODEL.MOBILENET = m = CN()
    m.NORM = "FrozenBN"  # FrozenBN | BN | SyncBN for every BatchNorm (frozen stages are FrozenBN regardless)
    m.OUT_FEATURES = ["res3", "res4", "res5"]  # of stem/res2/res3/res4/res5 (strides 2/4/8/16/32)
# ---- end MODEL.MOBILENET


def _add_dino(cfg: CN) -> None:
    cfg.MODEL.DINO = d = CN()
    d.IN_FEATURES = ["res3", "res4", "res5"]  # backbone outputs fed to the channel mapper
    d.HIDDEN_DIM = 256  # transformer width
    d.NHEADS = 8  # attention heads
    d.DIM_FEEDFORWARD = 2048  # FFN (and expert) hidden width
    d.ENC_LAYERS = 6  # deformable encoder layers
    d.DEC_LAYERS = 6  # deformable decoder layers
    d.DROPOUT = 0.0  # dropout in attention/FFN
    d.ACTIVATION = "relu"  # FFN activation
    d.NUM_FEATURE_LEVELS = 4  # len(IN_FEATURES) + extra stride-2 levels from the last one
    d.ENC_N_POINTS = 4  # deformable sampling points per level (encoder)
    d.DEC_N_POINTS = 4  # deformable sampling points per level (decoder)
    d.NUM_QUERIES = 900  # two-stage top-K proposals = decoder queries
    d.PE_TEMPERATURE = 10000  # feature-map sine embedding temperature (detrex 10000; IDEA-Research/DINO 20)
    d.PE_OFFSET = -0.5  # added to the 1-based pixel index before normalising (detrex -0.5; IDEA-Research/DINO 0)
    d.PE_NORMALIZE = True  # feature-map positions as fractions of the valid extent times PE_SCALE (both: True)
    d.PE_SCALE = 6.283185307179586  # 2*pi: scale of the normalised feature-map positions (both references)
    d.QUERY_PE_TEMPERATURE = 10000  # temperature of the decoder queries' reference-box sine embedding (both: 10000)
    d.SHARE_CLASS_HEAD = False  # one class head for all decoder layers (IDEA-Research/DINO True; detrex False)
    d.SHARE_BOX_HEAD = False  # one box head for all decoder layers (IDEA-Research/DINO True; detrex False)
    d.NUM_CLASSES = 0  # size of the unified label space; 0 = derived from DATASETS.TRAIN blocks
    d.DN_NUMBER = 100  # denoising queries (split into groups of 2 x max objects)
    d.DN_LABEL_NOISE_RATIO = 0.5  # probability of flipping a DN query's label
    d.DN_BOX_NOISE_SCALE = 1.0  # DN box noise scale
    d.CLASS_COST = 2.0  # Hungarian matching cost weights
    d.BBOX_COST = 5.0  # L1 box cost
    d.GIOU_COST = 2.0  # GIoU cost
    d.CLASS_WEIGHT = 1.0  # loss weights (same for aux, encoder and DN outputs)
    d.BBOX_WEIGHT = 5.0  # L1 box loss weight
    d.GIOU_WEIGHT = 2.0  # GIoU loss weight
    d.FOCAL_ALPHA = 0.25  # sigmoid focal loss alpha
    d.FOCAL_GAMMA = 2.0  # sigmoid focal loss gamma
    d.AUX_LOSS = True  # losses on every decoder layer and the encoder proposals
    d.NUM_SELECT = 300  # detections kept per image at inference (top-K over queries x classes)
    d.MSDA_IMPL = "auto"  # deformable attention: auto (torch-ms-deform-attn where built, else pytorch) | pytorch | ext


def _add_gem(cfg: CN) -> None:
    cfg.MODEL.GEM = g = CN()
    g.ROUTER = "gem"  # gem | dense | topk | softmoe | remoe | moepp | damex | gem_random | ... (ROUTER_REGISTRY name)
    g.NUM_EXPERTS = 8  # experts per MoE layer
    g.MOE_LAYERS = ["decoder.0", "decoder.2", "decoder.4"]  # FFNs that become expert banks
    g.EXPERTS_PER_UNIT = 1  # k_u: experts each unit is mapped to
    g.UNITS = []  # planned unit names (datasets, or "dataset/class" at class level)
    g.MAPPING = []  # per unit, its expert ids (list of lists); empty = plan before training
    g.MAPPING_WEIGHTS = []  # per unit, combination weights of its experts (k > 1)
    g.TEST_ROUTING = "dataset"  # dataset (known dataset id) | auto (a fitted classifier identifies the dataset)
    g.LOAD_CHECKPOINT_MAPPING = False  # take MAPPING/UNITS from the checkpoint instead of erroring
    g.ADOPT_CHECKPOINT_LAYOUT = False  # build as the checkpoint records: TRAIN order, ROUTER, experts, layers, mapping
    g.PLANNER = p = CN()
    p.LEVEL = "dataset"  # dataset | class: what a planning unit is
    p.SAMPLES_PER_UNIT = 32  # images (or boxes) sampled per unit for the affinity
    p.TAU = 1.0  # affinity softmax temperature, in units of the std of all unit-key cosines
    p.SLACK = 0.1  # expert capacity slack: C_j = (1 + slack) * sum_u s_u k_u / n
    p.BETA = 0.5  # importance a_u = s_u^-beta (normalised)
    p.SOLVER = "CBC"  # PuLP solver name for LP and MILP
    p.ROUNDING = "hierarchical"  # hierarchical | shmoys_tardos | exact (MILP)
    p.SEED = 0  # sampling and k-means seed
    p.KMEANS_ITERS = 50  # k-means iterations for expert keys
    p.IMAGE_SIZE = 224  # short side images are resized to for the affinity features
    p.MILP_TIME_LIMIT = 10.0  # seconds for the exact MILP (report, ROUNDING: exact); <= 0: report skips it
    g.TOPK = t = CN()
    t.K = 1  # experts per token
    t.CAPACITY_FACTOR = 1.25  # expert capacity = ceil(cf * T * k / E)
    t.BALANCE_COEF = 0.01  # Switch/GShard load-balancing loss coefficient
    t.Z_LOSS_COEF = 0.0  # router z-loss coefficient
    g.SOFTMOE = s = CN()
    s.SLOTS_PER_EXPERT = 1  # slots per expert
    g.REMOE = r = CN()
    r.L1_INIT = 1e-8  # initial coefficient of the load-weighted L1 penalty
    r.L1_MULTIPLIER = 1.2  # coefficient update factor toward the target sparsity
    r.TARGET_K = 1  # target active experts per token (sparsity 1 - k/E)
    r.ACTIVE_CAP = 0.0  # > 0: at most ACTIVE_CAP * tokens computed assignments per layer call, largest gates first
    g.MOEPP = m = CN()
    m.K = 2  # experts per token
    m.NUM_ZERO = 1  # zero experts
    m.NUM_COPY = 1  # copy experts
    m.NUM_CONSTANT = 2  # constant experts
    m.BALANCE_COEF = 0.01  # load-balancing loss coefficient over all experts
    g.DAMEX = dx = CN()
    dx.LOSS_COEF = 0.1  # cross-entropy coefficient toward the dataset's mapped expert, times the mean over MoE layers
    dx.CAPACITY_FACTOR = 1.25  # expert capacity = int(cf * ceil(T / E)) as in DAMEX's tutel layer; <= 0 = unlimited
    dx.GATE_NOISE = 1.0  # training: logits + GATE_NOISE * N(0, 1) / E pick the expert (tutel's gate_noise); 0 = none
    dx.BATCH_PRIORITIZED = True  # capacity claimed by descending top probability (tutel's batch-prioritised routing)
    dx.DATASET_TO_EXPERT = []  # [[dataset, expert], ...] per DATASETS.TRAIN dataset; [] = DAMEX's UODB map (UODB only)
    g.ADAPT = a = CN()
    a.NEW_EXPERTS = 0  # experts appended for a new domain in tools/adapt.py
    a.SHOTS = 10  # K-shot per class for the new domain
    a.SEED = 0  # seed of the K-shot sample
    a.MAX_ITER = 100  # fine-tuning iterations (constant LR, batch SOLVER.IMS_PER_BATCH)
    a.BASE_LR = 0.0002  # fine-tuning learning rate


def _add_data(cfg: CN) -> None:
    cfg.DATASETS.UODB_ROOT = ""  # UODB root; "" = $DETECTRON2_DATASETS, else ./datasets
    cfg.DATASETS.SYNTH = s = CN()
    s.ROOT = ""  # generated-data root; "" = <UODB root>/gem_synth
    s.IMAGES_PER_DOMAIN = 120  # training images of a regular domain (the rare one gets fewer)
    s.TEST_IMAGES_PER_DOMAIN = 30  # test images per domain
    s.IMAGE_SIZE = 256  # generated image side in pixels
    s.SEED = 0  # generator seed
    cfg.INPUT.CROP_BRANCH = b = CN()  # DINO's random choice between resize-only and resize-crop-resize
    b.PROB = 0.0  # probability of the crop branch per training image (DINO/DETR 0.5, set by Base-GEM-DINO.yaml)
    b.RESIZE_SHORT = (400, 500, 600)  # crop branch: short side first resized to one of these (no long-side cap)
    b.SIZE = (384, 600)  # crop branch: crop height and width each uniform in [min, min(max, side)]
    cfg.DATALOADER.DATASET_TEMPERATURE = 1.0  # dataset sampling weight = size^T (1 proportional, 0 uniform)
    cfg.DATALOADER.ONE_DATASET_PER_BATCH = False  # every batch from one dataset (Universal-DA style)


def _add_solver_test(cfg: CN) -> None:
    cfg.SOLVER.OPTIMIZER = "ADAMW"  # ADAMW | SGD
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1  # backbone LR = BASE_LR * this
    cfg.SOLVER.WEIGHT_DECAY_BIAS = 0.0  # gem_d2 default: no decay on biases (None = WEIGHT_DECAY, as in d2)
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0  # decay of embeddings (nn.Embedding tables, *_embed params)
    cfg.SOLVER.AMP.DTYPE = "float16"  # float16 | bfloat16 when SOLVER.AMP.ENABLED (CUDA only)
    cfg.TEST.UODB_COCO_AP = True  # also COCO AP/AP50/AP75 via pycocotools (~90% of evaluation time); False = NaN


def merge_config_file(cfg: CN, path: str) -> CN:
    """``cfg.merge_from_file(path)`` without ever executing YAML tags; returns ``cfg`` (merged in place).

    detectron2's ``merge_from_file`` falls back to ``yaml.unsafe_load`` when a file has tags
    ``yaml.safe_load`` refuses, so a config with ``!!python/object/apply:os.system [...]`` runs a command.
    Here every file (the config and each ``_BASE_``) is read with ``yaml.safe_load`` only; any
    ``!!python/...`` or other custom tag raises ``ValueError`` naming the file and the tag, before
    anything in the file is built. Otherwise the result equals ``merge_from_file``:

    - ``_BASE_`` is a path or a list of paths; ``~`` is expanded, and a path not starting with ``/``,
      ``http://`` or ``https://`` is relative to the folder of the file that names it. Bases may have
      bases. With a list, the bases are merged in order (a later one wins), then the file itself on top.
    - Merging is recursive for mappings; any other value replaces the base's. A mapping over a
      non-mapping base value is an error (``ValueError`` naming the file and key).
    - ``VERSION``: as ``merge_from_file`` (guessed when absent; older configs upgraded).

    Also errors, naming the file: missing file (and which file named it as base), malformed YAML, a
    top level that is not a mapping, a ``_BASE_`` that is not a path or list of paths, a ``_BASE_`` cycle.
    """
    import os

    import yaml
    from detectron2.config.compat import downgrade_config, guess_version, upgrade_config
    from detectron2.config.defaults import _C
    from detectron2.utils.file_io import PathManager

    def merge_a_into_b(a: dict, b: dict, filename: str) -> None:
        for k, v in a.items():
            if isinstance(v, dict) and k in b:
                if not isinstance(b[k], dict):
                    raise ValueError(f"{filename}: cannot inherit key {k!r} from base: it is a mapping here but "
                                     f"{b[k]!r} in the base")
                merge_a_into_b(v, b[k], filename)
            else:
                b[k] = v

    def load(filename: str, chain: tuple) -> dict:
        key = filename if filename.startswith(("http://", "https://")) else os.path.abspath(filename)
        if key in chain:
            raise ValueError(f"_BASE_ cycle: {' -> '.join(chain + (key,))}")
        named_by = f" (named as _BASE_ in {chain[-1]})" if chain else ""
        if not PathManager.isfile(filename):
            raise FileNotFoundError(f"config file not found: {filename}{named_by}")
        try:
            with PathManager.open(filename, "r") as f:
                data = yaml.safe_load(f)
        except yaml.constructor.ConstructorError as e:
            raise ValueError(
                f"{filename}: refused YAML tag ({e.problem} {e.problem_mark or ''}): configs are read with "
                f"yaml.safe_load and python tags (!!python/...) or other custom tags are not allowed, since they "
                f"build Python objects or call functions. Write the value as plain YAML.") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{filename}: malformed YAML: {e}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{filename}: the top level is a {type(data).__name__}, expected a mapping of keys")
        if "_BASE_" not in data:
            return data
        bases = data.pop("_BASE_")
        if isinstance(bases, str):
            bases = [bases]
        elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
            raise ValueError(f"{filename}: _BASE_ must be a path or a list of paths, got {bases!r}")
        merged: dict = {}
        for base in bases:
            if base.startswith("~"):
                base = os.path.expanduser(base)
            if not base.startswith(("/", "https://", "http://")):
                base = os.path.join(os.path.dirname(filename), base)
            merge_a_into_b(load(base, chain + (key,)), merged, filename)
        merge_a_into_b(data, merged, filename)
        return merged

    path = os.fspath(path)
    loaded = type(cfg)(load(path, ()))
    if cfg.VERSION != _C.VERSION:
        raise ValueError(f"merge_config_file({path}): cfg has VERSION {cfg.VERSION}, only the latest "
                         f"({_C.VERSION}) can be merged into")
    loaded_ver = loaded.get("VERSION", None)
    if loaded_ver is None:
        loaded_ver = guess_version(loaded, path)
    if loaded_ver > cfg.VERSION:
        raise ValueError(f"{path}: a v{loaded_ver} config cannot be merged into a v{cfg.VERSION} config")
    if loaded_ver == cfg.VERSION:
        cfg.merge_from_other_cfg(loaded)
    else:
        old = downgrade_config(cfg, to_version=loaded_ver)
        old.merge_from_other_cfg(loaded)
        new = upgrade_config(old)
        cfg.clear()
        cfg.update(new)
    return cfg
