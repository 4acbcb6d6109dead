"""Precision policies applied to the model (train/precision.py): which modules convert to FP8, what
stays bf16/fp32 at run time, the FSDP2 policy helper, bf16 AdamW moments, config plumbing."""

from __future__ import annotations

import logging
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.experts import GroupedExperts
from models.fp8 import Fp8GroupedGemm, Fp8Linear, fake_quantize
from models.norm import RMSNorm
from models.router import Router
from models.transformer import Transformer
import train.precision as precision
from tests.trainer_helpers import SMALL_MODEL, small_overrides
from train.config import ConfigError, OptimConfig, load_config
from train.optim import AdamWBF16Moments, fused_adamw_applies, make_adamw, parameter_groups
from train.precision import (AutocastGroupedGemm, PrecisionPolicy, apply_precision, bf16_matmul_slowdown, cpu_flags,
                             mixed_precision_policy, warn_if_slow_bf16)
from train.trainer import Trainer


@pytest.fixture
def model(repo_root):
    cfg = load_config(repo_root / "configs" / "tiny.yaml", SMALL_MODEL + ["data.tokenizer_vocab_size=512"])
    torch.manual_seed(0)
    return Transformer(cfg.model)


def _batch(vocab=512, b=2, s=16):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    return ids, torch.randint(0, vocab, (b, s), generator=g)


def test_fp8_conversion_selects_linears_and_experts_only(model):
    params_before = dict(model.named_parameters())
    keys_before = set(model.state_dict())
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    policy = apply_precision(model, "fp8")
    converted = set(policy.fp8_modules)
    experts = {n for n, m in model.named_modules() if isinstance(m, GroupedExperts)}
    assert converted == (linears - {"lm_head"}) | experts
    assert any(".self_attn.kv_b_proj" in n for n in converted) and any("mtp.0.eh_proj" == n for n in converted)
    for name, m in model.named_modules():
        if name == "lm_head":
            assert type(m) is nn.Linear
        elif name in linears:
            assert isinstance(m, Fp8Linear)
        if isinstance(m, GroupedExperts):
            assert isinstance(m.gemm, Fp8GroupedGemm)
        if isinstance(m, (Router, RMSNorm, nn.Embedding)):
            assert not isinstance(m, Fp8Linear) and name not in converted
    assert type(model.embed_tokens) is nn.Embedding
    # same Parameter objects (an optimizer built earlier still owns them), same checkpoint keys
    assert set(model.state_dict()) == keys_before
    for n, p in model.named_parameters():
        assert p is params_before[n] and p.dtype == torch.float32


def test_fp8_module_patterns(model):
    policy = apply_precision(model, "fp8", fp8_include=["layers.*.mlp.*"], fp8_exclude=["*shared*"])
    assert set(policy.fp8_modules) == {"layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj",
                                       "layers.1.mlp.experts"}
    assert not any("shared" in n or "self_attn" in n for n in policy.fp8_modules)
    assert type(model.layers["1"].self_attn.q_a_proj) is nn.Linear
    assert isinstance(model.layers["1"].mlp.experts.gemm, Fp8GroupedGemm)
    assert isinstance(model.mtp[0].block.mlp.experts.gemm, AutocastGroupedGemm)  # not selected: bf16
    with pytest.raises(ValueError, match="matches no"):
        apply_precision(Transformer(model.cfg), "fp8", fp8_include=["nothing.here"])


def _capture(model, names):
    seen = {}

    def hook(name):
        def fn(mod, args, out):
            seen[name] = (args, out)
        return fn

    for name in names:
        model.get_submodule(name).register_forward_hook(hook(name))
    return seen


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_kept_out_modules_stay_out_at_run_time(model, precision):
    """Under bf16/fp8: lm_head is a plain bf16 GEMM (no E4M3 rounding), router scores and gates are
    exact fp32, norms return fp32 math, the loss is fp32; converted projections really quantise."""
    policy = apply_precision(model, precision)
    seen = _capture(model, ["lm_head", "layers.1.mlp.gate", "layers.1.mlp.experts", "norm",
                            "layers.1.self_attn.q_a_proj", "mtp.0.block.mlp.gate"])
    ids, labels = _batch()
    with policy.autocast(torch.device("cpu")):
        out = model(ids, labels)
    assert out.lm_loss_sum.dtype == torch.float32
    (h,), logits = seen["lm_head"]
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits, F.linear(h.bfloat16(), model.lm_head.weight.bfloat16()), rtol=0, atol=0)
    for gate in ("layers.1.mlp.gate", "mtp.0.block.mlp.gate"):
        (x,), routing = seen[gate]
        router = model.get_submodule(gate)
        assert routing.scores.dtype == torch.float32 and routing.topk_weight.dtype == torch.float32
        torch.testing.assert_close(routing.scores, torch.sigmoid(x.float() @ router.weight.t()), rtol=1e-6, atol=1e-7)
    (xn,), yn = seen["norm"]
    assert yn.dtype == torch.float32
    (xe, _, _), ye = seen["layers.1.mlp.experts"]  # rows, counts, gates
    assert ye.dtype == torch.bfloat16  # the experts' grouped GEMM follows the policy too
    (xq,), yq = seen["layers.1.self_attn.q_a_proj"]
    w = model.layers["1"].self_attn.q_a_proj.weight
    plain = F.linear(xq.bfloat16(), w.bfloat16())
    if precision == "bf16":
        torch.testing.assert_close(yq, plain, rtol=0, atol=0)
    else:
        fq = (fake_quantize(xq.float().reshape(-1, xq.shape[-1])) @ fake_quantize(w, "blocks").t()).bfloat16()
        torch.testing.assert_close(yq.reshape(fq.shape), fq, rtol=1e-2, atol=1e-3)
        assert not torch.equal(yq, plain)
    out.lm_loss_sum.backward()
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32), n
    assert model.layers["1"].mlp.experts.gate_up_proj.grad is not None


def test_plain_autocast_would_route_in_bf16(model):
    """Why routers get the fp32 wrapper: autocast alone runs the gate's F.linear in bf16."""
    seen = _capture(model, ["layers.1.mlp.gate"])
    ids, labels = _batch()
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            m.gemm = AutocastGroupedGemm()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, labels)
    assert seen["layers.1.mlp.gate"][1].scores.dtype == torch.bfloat16


def test_mixed_precision_policy():
    assert mixed_precision_policy("fp32") is None
    for p in ("bf16", "fp8"):
        mp = mixed_precision_policy(p)
        assert mp.param_dtype == torch.bfloat16 and mp.reduce_dtype == torch.float32
    with pytest.raises(ValueError):
        mixed_precision_policy("fp16")


def test_bf16_moments_track_fp32_adamw():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(32, 64), nn.RMSNorm(64), nn.Linear(64, 8))
    mod = nn.Sequential(nn.Linear(32, 64), nn.RMSNorm(64), nn.Linear(64, 8))
    mod.load_state_dict(ref.state_dict())
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    cfg = OptimConfig(lr=1e-2, bf16_moments=True)
    opt = make_adamw(parameter_groups(mod, cfg.weight_decay), cfg)
    assert isinstance(opt, AdamWBF16Moments)
    opt_ref = make_adamw(parameter_groups(ref, cfg.weight_decay), OptimConfig(lr=1e-2))
    for step in range(30):
        x = torch.randn(16, 32)
        for m, o in ((ref, opt_ref), (mod, opt)):
            o.zero_grad()
            (m(x) ** 2).mean().backward()
            o.step()
    for (n, p), (_, q) in zip(mod.named_parameters(), ref.named_parameters()):
        moved = (q - start[n]).detach().norm()
        assert float((p - q).detach().norm()) < 0.05 * float(moved), n  # bf16 moments: ~2^-9 relative rounding
        st = opt.state[p]
        assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg_sq"].dtype == torch.bfloat16
        assert p.dtype == torch.float32
    # checkpoint round trip (load_state_dict casts state to fp32): moments go back to bf16
    opt2 = make_adamw(parameter_groups(mod, cfg.weight_decay), cfg)
    opt2.load_state_dict(opt.state_dict())
    (mod(torch.randn(4, 32)) ** 2).mean().backward()
    opt2.step()
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in opt2.state.values())


def test_fp8_config_fields(repo_root):
    cfg = load_config(repo_root / "configs" / "tiny.yaml", ["train.precision=fp8", "train.fp8.exclude=[lm_head,mtp.*]"])
    assert cfg.train.fp8.exclude == ["lm_head", "mtp.*"] and cfg.train.fp8.backend == "auto"
    with pytest.raises(ConfigError, match="train.fp8.backend"):
        load_config(repo_root / "configs" / "tiny.yaml", ["train.fp8.backend=cuda_magic"])


def test_make_adamw_fused_for_plain_params_matches_foreach():
    """Plain tensors get torch's fused AdamW kernel; its steps equal the foreach implementation's."""
    torch.manual_seed(0)
    mods = [nn.Sequential(nn.Linear(12, 20), nn.RMSNorm(20), nn.Linear(20, 3)) for _ in range(2)]
    mods[1].load_state_dict(mods[0].state_dict())
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    groups = parameter_groups(mods[0], cfg.weight_decay)
    assert fused_adamw_applies(groups)
    fused = make_adamw(groups, cfg)
    assert fused.defaults["fused"] and not fused.defaults["foreach"]
    foreach = torch.optim.AdamW(parameter_groups(mods[1], cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                                eps=cfg.eps, foreach=True)
    for _ in range(5):
        x = torch.randn(8, 12)
        for m, o in zip(mods, (fused, foreach)):
            o.zero_grad()
            (m(x) ** 2).mean().backward()
            o.step()
    for p, q in zip(mods[0].parameters(), mods[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # a non-float parameter (or a DTensor, as under FSDP/TP) falls back to foreach
    odd = [{"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64))], "weight_decay": 0.0}]
    assert not fused_adamw_applies(odd)
    assert make_adamw(odd, cfg).defaults["foreach"]


def test_bf16_warning_on_cpus_without_bf16_instructions(tmp_path):
    """Only bf16 compute on a CPU whose flags lack avx512_bf16/amx_bf16 warns; the slowdown is measured."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 fma\n")
    flags = cpu_flags(str(cpuinfo))
    assert flags == {"fpu", "sse2", "avx2", "fma"} and cpu_flags(str(tmp_path / "none")) is None
    bf16, cpu = PrecisionPolicy("bf16", torch.bfloat16), torch.device("cpu")
    msg = warn_if_slow_bf16(bf16, cpu, flags)
    assert msg is not None and "train.precision=bf16" in msg and "avx512_bf16" in msg
    assert re.search(r"runs [\d.]+x slower than fp32", msg), msg
    assert warn_if_slow_bf16(bf16, cpu, flags | {"avx512_bf16"}) is None
    assert warn_if_slow_bf16(bf16, cpu, flags | {"amx_bf16"}) is None
    assert warn_if_slow_bf16(PrecisionPolicy("fp32", torch.float32), cpu, flags) is None
    assert bf16_matmul_slowdown(n=64, seconds=0.01) > 0


def test_bf16_run_warns_once_on_rank0(repo_root, tmp_path, monkeypatch, caplog):
    """A real bf16 run on a (mocked) AVX2-only CPU logs the warning once, at start-up."""
    monkeypatch.setattr(precision, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": {"sse2", "avx2", "fma"})
    cfg = load_config(repo_root / "configs" / "tiny.yaml",
                      small_overrides(tmp_path / "run", tmp_path / "cache", **{"train.precision": "bf16",
                                                                               "train.steps": 2}))
    with caplog.at_level(logging.WARNING, logger="moeforge"):
        Trainer(cfg).fit()
    warnings = [r.getMessage() for r in caplog.records if "without bf16 instructions" in r.getMessage()]
    assert len(warnings) == 1, warnings
    caplog.clear()
    monkeypatch.setattr(precision, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": {"avx2", "avx512_bf16"})
    with caplog.at_level(logging.WARNING, logger="moeforge"):
        Trainer(cfg)
    assert not [r for r in caplog.records if "without bf16 instructions" in r.getMessage()]
