"""FP8 dispatch (report §3.3): under train.precision=fp8 the routed experts' input is quantised once (1x128
tiles) before the dispatcher moves it, travels as E4M3 bytes + fp32 scales, and feeds the FP8 grouped GEMM
without a second quantisation; its gradient returns in the compute dtype.

Per-row tiles commute with selecting and permuting rows, so the GEMM gets exactly the operands its own
quantisation made before: checked bitwise on the rows, on one GEMM (output and all gradients), on whole
models (every recompute mode, V2 capacity mode, gpt-oss) single-process, and on EP2 training (gloo, FSDP2;
dropless with overlap off, capacity mode with overlap on) against FP8 without it: losses, grad norms and
parameters equal.
The bytes the ledger counts under FP8 dispatch are checked in tests/test_comm_ledger.py (ep2_fsdp_fp8).
"""

from __future__ import annotations

import pytest
import torch

import models.fp8 as fp8
from models.fp8 import Fp8GroupedGemm, Fp8Recipe, QuantisedRows, quantise_rows, quantize_tiles
from tests.distributed import run_ranks
from tests.test_recompute import MODES, V2_ROUTING, step
from tests.trainer_helpers import small_overrides


class GemmInputs:
    """Counts the FP8 grouped GEMMs that quantised their input themselves (`own`: without FP8 dispatch
    gate_up and down, with it only down) and those that took rows quantised before dispatch (`given`)."""

    inner = staticmethod(fp8._grouped_forward)

    def __init__(self) -> None:
        self.own = self.given = 0

    def __call__(self, x, weight, counts, offsets, recipe, out_dtype, weights, quantised=None):
        if quantised is None:
            self.own += 1
        else:
            self.given += 1
            assert x.stride() == (0, 0)  # x is only the rows' gradient stand-in
        return self.inner(x, weight, counts, offsets, recipe, out_dtype, weights, quantised)


def spy_gemm_inputs(monkeypatch) -> GemmInputs:
    spy = GemmInputs()
    monkeypatch.setattr(fp8, "_grouped_forward", spy)
    return spy


def test_rows_quantised_before_dispatch_are_the_gemms_own_operands(monkeypatch):
    g = torch.Generator().manual_seed(0)
    hidden, rows, experts = 200, 24, 3  # a ragged last tile
    x = (torch.randn(rows, hidden, generator=g) * torch.logspace(-3, 2, rows).unsqueeze(1)).to(torch.bfloat16)
    index = torch.randint(0, rows, (40,), generator=g)  # rows repeated and permuted, as a dispatch does
    sent = quantise_rows(x, 128).index_select(0, index)
    q, s = quantize_tiles(x[index], 128)
    assert torch.equal(sent.data.view(torch.uint8), q.view(torch.uint8)) and torch.equal(sent.scales, s)
    assert sent.shape == (40, hidden) and sent.dtype == torch.bfloat16 and sent.grad.stride() == (0, 0)

    weight = torch.randn(experts, 2 * 64, hidden, generator=g, requires_grad=True)
    counts = torch.tensor([15, 0, 25])
    offsets = counts.cumsum(0).to(torch.int32)
    gemm = Fp8GroupedGemm(Fp8Recipe(backend="emulate"))
    grad_out = torch.randn(40, 128, generator=g).to(torch.bfloat16)

    def run(quantised_first: bool):
        leaf = x.detach().requires_grad_(True)
        w = weight.detach().clone().requires_grad_(True)
        rows = quantise_rows(leaf, 128).index_select(0, index) if quantised_first else leaf.index_select(0, index)
        y = gemm(rows, w, counts, offsets)
        y.backward(grad_out)
        return y, leaf.grad, w.grad

    spy = spy_gemm_inputs(monkeypatch)
    calls = []
    monkeypatch.setattr(fp8, "quantize_tiles", lambda t, tile=128: calls.append(tuple(t.shape)) or quantize_tiles(t, tile))
    want = run(False)
    assert (spy.own, spy.given) == (1, 0) and calls[0] == (40, hidden)
    calls.clear()
    got = run(True)
    assert (spy.own, spy.given) == (1, 1)
    assert calls[0] == (rows, hidden) and (40, hidden) not in calls  # once per token, never on the receiver
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert got[1].dtype == torch.bfloat16  # the gradient of the dispatched rows: compute dtype
    with pytest.raises(ValueError, match="1x64 tiles"):
        gemm(quantise_rows(x, 64), weight, torch.tensor([rows, 0, 0]), torch.tensor([rows] * 3, dtype=torch.int32))


@pytest.mark.parametrize("routing", ["v3", "v2"])
def test_models_train_bitwise_as_without_fp8_dispatch(routing, monkeypatch, single_thread):
    """Every recompute mode, dropless (V3) and capacity mode (V2): loss, gradients and kept bytes equal."""
    routing_cfg = V2_ROUTING if routing == "v2" else None
    for mode, modules, n in [("none", (), 0)] + MODES:
        spy = spy_gemm_inputs(monkeypatch)
        monkeypatch.setattr(Fp8GroupedGemm, "quantised_dispatch", False)
        loss, grads, kept, _ = step(mode, modules, n, "fp8", routing_cfg)
        assert spy.own > 0 and spy.given == 0
        own = spy.own
        monkeypatch.setattr(Fp8GroupedGemm, "quantised_dispatch", True)
        spy = spy_gemm_inputs(monkeypatch)
        got_loss, got_grads, got_kept, _ = step(mode, modules, n, "fp8", routing_cfg)
        assert spy.given == spy.own == own // 2, (mode, modules)  # gate_up given, down its own
        label = f"{routing} {mode} {list(modules)} every {n}"
        assert torch.equal(got_loss, loss), label
        # what autograd keeps: unchanged, but full's expert regions hold the FP8 rows as their input instead
        # of rows in the stream's dtype (train/activations.py; exact in tests/test_plan_measured.py)
        assert got_kept == kept if mode != "full" else got_kept < kept, label
        assert got_grads.keys() == grads.keys(), label
        for name, g in grads.items():
            assert torch.equal(got_grads[name], g), f"{label}: {name}"


def test_gpt_oss_experts_take_fp8_rows(monkeypatch, single_thread):
    from pathlib import Path

    from models.transformer import Transformer
    from tests.trainer_helpers import SMALL_GPT_OSS
    from train.config import load_config
    from train.precision import apply_precision

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny_gpt_oss.yaml",
                      SMALL_GPT_OSS + ["data.tokenizer_vocab_size=512"]).model
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for quantised in (False, True):
        monkeypatch.setattr(Fp8GroupedGemm, "quantised_dispatch", quantised)
        spy = spy_gemm_inputs(monkeypatch)
        torch.manual_seed(0)
        model = Transformer(cfg)
        policy = apply_precision(model, "fp8")
        with policy.autocast(torch.device("cpu")):
            loss = model(ids, ids).loss(0.0)
        loss.backward()
        assert spy.own > 0 and spy.given == (spy.own if quantised else 0)  # gate_up given, down its own
        results.append((loss.detach(), [p.grad for p in model.parameters() if p.grad is not None]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))


# ------------------------------------------------------------------------------------------ EP2
VARIANTS = {  # name -> overrides; each run with FP8 dispatch on and off
    "dropless_overlap_off": {"parallel.ep_overlap": "false"},
    "capacity_overlap_on": {"parallel.ep_overlap": "true", "model.capacity_factor": 1.0},
}


def _ep2_worker(rank: int, runs: list[tuple[str, bool, list[str]]]) -> dict:
    """Every (variant, fp8 dispatch, overrides) run in turn in one process group: metrics, final state and
    how the expert GEMMs got their input."""
    from parallel.mesh import init_distributed
    from parallel.state import full_state_dict
    from tests.parity_worker import REPO, history_metrics
    from train.config import load_config
    from train.trainer import Trainer

    out = {}
    for name, quantised, overrides in runs:
        Fp8GroupedGemm.quantised_dispatch = quantised
        spy = GemmInputs()
        fp8._grouped_forward = spy
        try:
            cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
            ctx = init_distributed(cfg.parallel, cfg.model)
            trainer = Trainer(cfg, ctx)
            history = trainer.fit()
            state = full_state_dict(trainer.model, ctx)
        finally:
            fp8._grouped_forward = spy.inner
        out[f"{name}/{quantised}"] = {"metrics": history_metrics(history), "state": state,
                                      "gemm": {"own": spy.own, "given": spy.given}}
    torch.distributed.destroy_process_group()
    return out


@pytest.mark.multirank
def test_ep2_fp8_dispatch_trains_bitwise_as_without_it(tmp_path, tmp_path_factory):
    cache = tmp_path_factory.mktemp("fp8_dispatch_cache")
    runs = [(name, quantised, small_overrides(tmp_path / f"{name}_{quantised}", cache, **{
        "train.steps": 2, "train.micro_batch_size": 2, "checkpoint.at_end": "false", "train.threads": 1,
        "train.precision": "fp8", "optim.warmup_steps": 1, "parallel.dp_shard": 2, "parallel.ep": 2,
        "parallel.data_parallel": "fsdp", **extra}))
        for name, extra in VARIANTS.items() for quantised in (True, False)]
    results = run_ranks(2, _ep2_worker, runs)
    for rank, result in enumerate(results):
        for name in VARIANTS:
            on, off = result[f"{name}/True"], result[f"{name}/False"]
            assert on["gemm"]["given"] == on["gemm"]["own"] > 0, (name, on["gemm"])  # gate_up given, down its own
            assert off["gemm"] == {"own": 2 * on["gemm"]["given"], "given": 0}, (name, off["gemm"])
            for key in ("loss", "grad_norm", "mtp_loss", "aux_loss"):
                assert on["metrics"][key] == off["metrics"][key], (rank, name, key)
            assert on["state"].keys() == off["state"].keys()
            for key, value in off["state"].items():
                assert torch.equal(on["state"][key], value), (rank, name, key)
    print("\nEP2 fp8 losses (dispatch on = off):", {n: results[0][f"{n}/True"]["metrics"]["loss"] for n in VARIANTS})
