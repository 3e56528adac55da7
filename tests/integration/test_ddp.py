"""2-process gloo DDP with gem_d2's launcher: real GEMDINO, GEM-routed experts, one dataset per rank.

The reference is one process on the concatenated global batch. DDP averages the ranks' gradients,
and the criterion normalises by the all-reduced box count divided by the world size, so the mean
of the ranks' losses equals the single-process loss on the global batch: gradients must match.
Batch-dependent randomness is switched off so that this holds exactly: no denoising queries (their
groups depend on the batch's largest GT count and their noise is random), frozen BN (batch statistics
differ), no flip, equal image sizes (same padding).
"""
import gem_d2  # noqa: F401,I001  (compat shims before detectron2)

import os

import pytest
import torch
import torch.distributed as dist
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils import comm

from gem_d2.config import add_gem_config
from gem_d2.data import GemDatasetMapper, load_gem_datasets, register_synthetic, synthetic
from gem_d2.engine import create_ddp_model, launch

pytestmark = pytest.mark.slow

CONFIG = os.path.join(os.path.dirname(__file__), "..", "tiny_gem_dino.yaml")
TRAIN = ("synth_photo_train", "synth_medical_train")


def _cfg():
    cfg = get_cfg()
    add_gem_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list([
        "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.DINO.DN_NUMBER", 0,
        "MODEL.GEM.UNITS", list(TRAIN), "MODEL.GEM.MAPPING", [[0], [1]], "INPUT.RANDOM_FLIP", "none",
        "DATASETS.TRAIN", TRAIN, "DATASETS.TEST", (),
    ])
    return cfg


def _batches(cfg):
    """Two images of each training dataset, mapped as for training (deterministic here)."""
    mapper = GemDatasetMapper(cfg, True)
    return [[mapper(r) for r in records[:2]] for records in load_gem_datasets(cfg.DATASETS.TRAIN)]


def _grads(model):
    return {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def _worker(payload_path, out_path, synth_root):
    register_synthetic(synth_root)
    payload = torch.load(payload_path, weights_only=False)
    cfg = _cfg()
    model = build_model(cfg)
    model.load_state_dict(payload["state"])
    ddp = create_ddp_model(model, broadcast_buffers=False)
    rank = comm.get_rank()
    info = {"rank": rank, "world": comm.get_world_size(), "local_rank": comm.get_local_rank(),
            "backend": dist.get_backend(), "threads": torch.get_num_threads(), "wrapped": type(ddp).__name__}
    batches = payload["batches"]
    losses = ddp(batches[rank])  # rank 0: photo only (expert 0), rank 1: medical only (expert 1)
    sum(losses.values()).backward()
    first = _grads(model)
    stats = {k: v.clone() for k, v in model.routing_stats.items()}
    # A second step with the datasets swapped: DDP raises or hangs here if a parameter got no
    # gradient in the previous step (no find_unused_parameters).
    model.zero_grad()
    losses = ddp(batches[1 - rank])
    sum(losses.values()).backward()
    comm.synchronize()
    if rank == 0:
        torch.save({"info": info, "grads": first, "stats": stats, "all_info": comm.all_gather(info)}, out_path)
    else:
        comm.all_gather(info)


@pytest.mark.timeout(300)
def test_two_process_gloo_ddp_matches_single_process_global_batch(small_synth, tmp_path):
    root = synthetic.registered_synthetic_root()
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _batches(cfg)
    assert [b["dataset_id"] for b in batches[0]] == [0, 0] and [b["dataset_id"] for b in batches[1]] == [1, 1]

    losses = model(batches[0] + batches[1])  # one process, the global batch
    sum(losses.values()).backward()
    reference = _grads(model)

    payload, out = str(tmp_path / "payload.pth"), str(tmp_path / "ddp.pth")
    torch.save({"state": state, "batches": batches}, payload)
    launch(_worker, 2, dist_url="auto", args=(payload, out, root), device="cpu")
    result = torch.load(out, weights_only=False)

    infos = sorted(result["all_info"], key=lambda i: i["rank"])
    assert [(i["rank"], i["world"], i["local_rank"], i["backend"]) for i in infos] == [
        (0, 2, 0, "gloo"), (1, 2, 1, "gloo")]
    assert all(i["wrapped"] == "DistributedDataParallel" for i in infos)
    assert all(i["threads"] == max(1, len(os.sched_getaffinity(0)) // 2) for i in infos)
    # rank 0 saw only the photo dataset: its decoder.0 tokens all went to expert 0
    counts = result["stats"]["decoder.0/tokens_per_expert"]  # (datasets, experts)
    assert counts[0, 0] > 0 and counts[0, 1] == 0 and counts[1].sum() == 0

    ddp_grads = result["grads"]
    assert set(ddp_grads) == set(reference)
    experts = [n for n in reference if "decoder" in n and ".experts." in n]
    assert experts and all(reference[n].shape[0] == 2 for n in experts), experts  # stacked (E, ...) banks
    for name, ref in reference.items():
        got = ddp_grads[name]
        assert (ref is None) == (got is None), name
        if ref is not None:
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6, msg=name)
    # both experts were trained by the global batch, each by one rank only
    assert all(ddp_grads[n][j].abs().sum() > 0 for n in experts for j in range(2))
