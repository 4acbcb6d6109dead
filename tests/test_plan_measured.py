"""The planner's activation and weight-copy figures against the bytes autograd really saves.

train/memory_probe.py counts every saved storage once, per layer kind, for one micro-batch of the real model
on CPU; train/activations.py (the planner's activation term) and train.plan's per-rank figures must fall
within 10% of it, kind by kind: the tiny config in fp32, bf16 and fp8, and a wider one (hidden 512, q_proj
without query compression, v_head_dim == qk_head_dim so nothing is padded, 2 shared experts of a width that
is not a multiple of 128) in bf16 and fp8.
"""

from __future__ import annotations

import pytest

from train.activations import ActivationModel, Recompute
from train.config import load_config
from train.memory_probe import KINDS, measure_saved_bytes
from train.plan import GiB, plan

TOLERANCE = 0.10
MICRO_BATCH, SEQ = 2, 48
WIDER = ["model.hidden_size=512", "model.intermediate_size=1536", "model.moe_intermediate_size=384",
         "model.q_lora_rank=null", "model.kv_lora_rank=128", "model.n_shared_experts=2", "model.num_attention_heads=4",
         "model.qk_nope_head_dim=64", "model.qk_rope_head_dim=32", "model.v_head_dim=96"]
CASES = [("tiny", "fp32", []), ("tiny", "bf16", []), ("tiny", "fp8", []), ("wider", "bf16", WIDER),
         ("wider", "fp8", WIDER)]


def _cfg(repo_root, precision, extra):
    return load_config(repo_root / "configs" / "tiny.yaml", [
        "model.num_hidden_layers=2", f"train.precision={precision}", f"train.micro_batch_size={MICRO_BATCH}",
        f"train.seq_len={SEQ}", *extra])


@pytest.mark.parametrize("name,precision,extra", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_predicted_saved_bytes_within_10_percent_of_measured(repo_root, name, precision, extra):
    cfg = _cfg(repo_root, precision, extra)
    measured = measure_saved_bytes(cfg, micro_batches=1, backward=False)
    tokens = MICRO_BATCH * SEQ
    predicted = ActivationModel(cfg.model, precision, Recompute(), MICRO_BATCH).by_kind(tokens)
    got = measured.activations[0]
    for kind in KINDS:
        assert got[kind] > 0, kind
        assert predicted[kind] == pytest.approx(got[kind], rel=TOLERANCE), (kind, predicted[kind], got[kind])

    # train.plan's single-process figures: activations (blocks, MTP, token ids) + the head (in its buffers term)
    # are the measured total; the weight copies are what the GEMMs saved (bf16 casts, or FP8 copies once).
    rank = plan(cfg, 1)["memory"]["ranks"][0]
    head = predicted["head"]
    assert rank["activations"] * GiB == pytest.approx(measured.total_activations - got["head"], rel=TOLERANCE)
    fp8_dequantised = 0.0  # fp8: the emulated expert GEMM's transient fp32 gate_up weights of one layer
    if precision == "fp8":
        mc = cfg.model
        fp8_dequantised = 4 * mc.n_routed_experts * 2 * mc.moe_intermediate_size * mc.hidden_size
    assert rank["buffers"] * GiB == pytest.approx(head + fp8_dequantised, rel=1e-3)
    if precision == "fp32":
        assert rank["compute_copies"] == 0 and measured.weight_copies == 0
    else:
        assert rank["compute_copies"] * GiB == pytest.approx(measured.weight_copies, rel=TOLERANCE)
