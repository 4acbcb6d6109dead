"""DeepSeek-V3's released FP8 checkpoint format, both ways (train/hf/quant_fp8.py): `--dtype fp8` writes it,
transformers' fine-grained FP8 loader dequantises it on CPU to the logits of moeforge's FP8-emulated weights,
`init_from_hf` reads it back to the dequantised weights, bad files are refused by name; `--dtype bf16`."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from models.fp8 import fake_quantize
from models.transformer import Transformer
from tests.test_export import hf_load, input_ids, save_synthetic_checkpoint, small_v3_config
from train.export import main
from train.hf import deepseek_v3, quant_fp8
from train.hf.read import HFImportError, hf_model_config, init_from_hf
from train.hf.write import INDEX_FILE

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' FP8 quantizer refuses to load without it

TOL = 1e-5  # fp32 forward of the same (dequantised) weights
# FP8 weights vs fp32: relative RMS logit error, measured 0.054 on this random-init model (0.049 with every
# layer dense; 0.108 with moe_intermediate_size 64, where the rounding flips more near-tied expert choices);
# each weight itself keeps E4M3's <= 2^-4 relative error, checked element by element below.
FP8_REL_TOL = 0.1
# Dimensions that are multiples of 128 or below it (transformers' CPU dequantiser derives the block size
# from the scale grid, so a ragged edge above 128 reads wrong there); 1-4 blocks per weight.
WIDE = dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=128, num_attention_heads=2, q_lora_rank=64,
            kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, num_nextn_predict_layers=1)
# Ragged edges: 200 = 128 + 72 rows/columns, 72 < 128.
RAGGED = dict(WIDE, hidden_size=200, intermediate_size=328, moe_intermediate_size=136)


def export(tmp: Path, dtype: str, **cfg_values) -> tuple[Transformer, Path]:
    model, checkpoint = save_synthetic_checkpoint(tmp / "run", small_v3_config(**cfg_values))
    out = tmp / f"hf_{dtype}"
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), "--dtype", dtype]) == 0
    return model, out


def file_tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(set(json.loads((out / INDEX_FILE).read_text())["weight_map"].values())):
        tensors.update(load_file(str(out / f)))
    return tensors


def dequantised_by_hand(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """W[n, k] = q[n, k] * scale_inv[n // 128, k // 128], written out here independently of moeforge."""
    n, k = q.shape
    rows = torch.arange(n)[:, None] // 128
    cols = torch.arange(k)[None, :] // 128
    return q.float() * scale_inv[rows, cols]


def model_with(model: Transformer, value_of) -> Transformer:
    """A copy of `model` whose every HF tensor is `value_of(entry, tensor)` (entry: the family layout's)."""
    copy = Transformer(model.cfg).eval()
    copy.load_state_dict(model.state_dict())
    state = copy.state_dict(keep_vars=True)
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    with torch.no_grad():
        for entry in deepseek_v3.layout(model.cfg, shapes, deepseek_v3.V3):
            if not entry.shared:
                target = entry.take(state[entry.src])
                target.copy_(value_of(entry, target.detach().clone()))
    return copy


def fp8_emulated(model: Transformer) -> Transformer:
    """moeforge's FP8 weights: the quantised Linears through E4M3 128x128 blocks (models/fp8.py), the rest bf16."""

    def value_of(entry, t):
        if quant_fp8.quantises(entry.hf_name, entry.shape, deepseek_v3.FP8_NOT_CONVERTED):
            return fake_quantize(t, "blocks")
        return t if entry.keep_fp32 else t.to(torch.bfloat16).float()

    return model_with(model, value_of)


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float()


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp8_wide")
    model, fp8 = export(tmp, "fp8", **WIDE)
    return model, fp8


def test_fp8_export_is_the_released_format(wide):
    model, out = wide
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128]}
    assert config["torch_dtype"] == "bfloat16"
    tensors = file_tensors(out)
    L = model.cfg.num_hidden_layers
    bf16 = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.1.mlp.gate.weight",
            f"model.layers.{L}.eh_proj.weight", f"model.layers.{L}.shared_head.head.weight",
            f"model.layers.{L}.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
            "model.layers.0.self_attn.kv_a_layernorm.weight"]
    for name in bf16:
        assert tensors[name].dtype == torch.bfloat16 and quant_fp8.scale_name(name) not in tensors, name
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    quantised = [k for k, t in tensors.items() if t.dtype == torch.float8_e4m3fn]
    for name in ("model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.kv_b_proj.weight",
                 "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.experts.7.up_proj.weight",
                 "model.layers.1.mlp.shared_experts.gate_proj.weight", f"model.layers.{L}.self_attn.o_proj.weight"):
        assert name in quantised, name
    for name in quantised:
        scale = tensors[quant_fp8.scale_name(name)]
        n, k = tensors[name].shape
        assert scale.dtype == torch.float32 and tuple(scale.shape) == (math.ceil(n / 128), math.ceil(k / 128)), name
    state = model.state_dict()
    for entry in deepseek_v3.layout(model.cfg, {n: t.shape for n, t in state.items()}, deepseek_v3.V3):
        if entry.hf_name in quantised:  # E4M3: 3 mantissa bits (<= 2^-4 relative), subnormal step 2^-9 * scale
            w = entry.take(state[entry.src])
            scale = tensors[quant_fp8.scale_name(entry.hf_name)]
            error = (dequantised_by_hand(tensors[entry.hf_name], scale) - w).abs()
            bound = w.abs() * 2**-4 + 2**-10 * scale.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
            assert bool((error <= bound * (1 + 1e-6)).all()), entry.hf_name
            assert float(w.abs().max()) == pytest.approx(448 * float(scale.max()), rel=1e-6)  # amax -> 448
    assert set(tensors) == set(quantised) | {quant_fp8.scale_name(n) for n in quantised} | {
        k for k, t in tensors.items() if t.dtype in (torch.bfloat16, torch.float32)}
    assert len(tensors) == len(json.loads((out / INDEX_FILE).read_text())["weight_map"])


def test_transformers_dequantises_fp8_export_to_moeforge_fp8_logits(wide, tmp_path):
    model, fp8 = wide
    hf, info = hf_load(fp8)  # CPU: transformers' FineGrainedFP8 quantizer switches to dequantize=True
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert hf.model.layers[0].self_attn.q_a_proj.weight.dtype == torch.float32  # dequantised, not FP8Linear
    ids = input_ids(model.cfg.vocab_size)
    theirs = logits(hf, ids)
    assert float((theirs - logits(fp8_emulated(model), ids)).abs().max()) <= TOL
    fp32_export = tmp_path / "hf_fp32"
    assert main(["--checkpoint", str(next((fp8.parent / "run" / "checkpoints").iterdir())), "--out",
                 str(fp32_export), "--dtype", "fp32"]) == 0
    reference = logits(hf_load(fp32_export)[0], ids)
    rel = float((theirs - reference).norm() / reference.norm())
    assert 0 < rel <= FP8_REL_TOL, rel


@pytest.mark.parametrize("shape", ["wide", "ragged"])
def test_init_from_hf_dequantises_fp8(wide, tmp_path, shape):
    model, out = wide if shape == "wide" else export(tmp_path, "fp8", **RAGGED)
    tensors = file_tensors(out)

    def from_files(entry, t):
        name = entry.hf_name
        scale = tensors.get(quant_fp8.scale_name(name))
        return tensors[name].float() if scale is None else dequantised_by_hand(tensors[name], scale)

    expected = model_with(model, from_files)
    loaded = Transformer(hf_model_config(out)).eval()
    report = init_from_hf(loaded, out)
    assert not report.ignored and not report.missing_mtp
    for name, t in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    ids = input_ids(model.cfg.vocab_size)
    assert torch.equal(logits(loaded, ids), logits(expected, ids))
    if shape == "ragged":
        assert tuple(tensors["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape) == (3, 2)  # 328 x 200


def test_fp8_import_streams_one_shard_at_a_time(wide, tmp_path, monkeypatch):
    """A many-shard FP8 export: sized by its FP8 bytes, read back with one shard open at a time, each opened once."""
    import safetensors

    model, out = wide
    sharded = tmp_path / "sharded"
    checkpoint = next((out.parent / "run" / "checkpoints").iterdir())
    assert main(["--checkpoint", str(checkpoint), "--out", str(sharded), "--dtype", "fp8", "--max-shard-size", "300KB"]) == 0
    index = json.loads((sharded / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((sharded / f).stat().st_size < 300_000 + 40_000 for f in shards)  # + header
    tensors = file_tensors(sharded)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    opened, open_now, most_open = [], [0], [0]
    real_open = safetensors.safe_open

    class CountingOpen:
        def __init__(self, path, **kw):
            self.handle = real_open(path, **kw)
            opened.append(Path(path).name)

        def __enter__(self):
            open_now[0] += 1
            most_open[0] = max(most_open[0], open_now[0])
            self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            open_now[0] -= 1
            return self.handle.__exit__(*exc)

        def get_tensor(self, key):
            return self.handle.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", CountingOpen)
    loaded = Transformer(model.cfg)
    init_from_hf(loaded, sharded)
    assert most_open[0] == 1 and open_now[0] == 0 and sorted(opened) == shards
    reference = Transformer(model.cfg)
    monkeypatch.undo()
    init_from_hf(reference, out)
    for name, t in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_init_from_hf_reads_transformers_fused_fp8_experts(wide, tmp_path):
    """transformers' fused expert keys (`experts.gate_up_proj` [E, 2I, H] + `gate_up_proj_scale_inv`) read alike."""
    from safetensors.torch import save_file

    model, out = wide
    tensors = file_tensors(out)
    fused = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    for layer in (1, model.cfg.num_hidden_layers):  # the MoE layer and the MTP block
        prefix = f"model.layers.{layer}.mlp.experts."
        for name, parts in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
            for suffix in ("", "_scale_inv"):  # FP8 stacked through its bytes (cat/stack need not take float8)
                raw = [[tensors[f"{prefix}{e}.{part}.weight{suffix}"] for part in parts]
                       for e in range(model.cfg.n_routed_experts)]
                stacked = torch.stack([torch.cat([t.view(torch.uint8) if not suffix else t for t in ts]) for ts in raw])
                fused[prefix + name + suffix] = stacked.view(torch.float8_e4m3fn) if not suffix else stacked
    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    shutil.copy(out / "config.json", fused_dir)
    save_file(fused, str(fused_dir / "model.safetensors"), metadata={"format": "pt"})
    per_expert, from_fused = Transformer(model.cfg), Transformer(model.cfg)
    init_from_hf(per_expert, out)
    report = init_from_hf(from_fused, fused_dir)
    assert not report.ignored
    for name, t in per_expert.state_dict().items():
        assert torch.equal(from_fused.state_dict()[name], t), name


def rewrite(out: Path, key: str, value) -> None:
    """Replace (None: delete) one tensor of an HF directory in place."""
    from safetensors.torch import load_file, save_file

    index = json.loads((out / INDEX_FILE).read_text())
    f = out / index["weight_map"][key]
    tensors = load_file(str(f))
    if value is None:
        del tensors[key], index["weight_map"][key]
        (out / INDEX_FILE).write_text(json.dumps(index))
    else:
        tensors[key] = value
    save_file(tensors, str(f), metadata={"format": "pt"})


def test_bad_fp8_checkpoints_are_refused_by_name(wide, tmp_path):
    model, fp8 = wide
    name = "model.layers.0.self_attn.o_proj.weight"
    cases = [
        (lambda out: rewrite(out, name + "_scale_inv", torch.ones(1, 1)),
         rf"{name}_scale_inv has shape \(1, 1\); a weight of shape \(256, 64\) in 128x128 blocks needs \(2, 1\)"),
        (lambda out: rewrite(out, name + "_scale_inv", None), rf"{name} is float8_e4m3fn but {name}_scale_inv is missing"),
        (lambda out: _edit_config(out, quant_method="awq"), r"quant_method='awq' is not supported \(only 'fp8'"),
        (lambda out: _edit_config(out, weight_block_size=None), r"weight_block_size=None: expected two positive"),
        (lambda out: _edit_config(out, drop=True), r"is an FP8 block scale, but config.json has no quantization_config"),
        (lambda out: rewrite(out, name + "_scale_inv", torch.ones(2, 1, dtype=torch.int32)),
         rf"{name}_scale_inv is torch.int32, expected fp32 scales"),
    ]
    for i, (damage, message) in enumerate(cases):
        out = tmp_path / f"bad{i}"
        shutil.copytree(fp8, out)
        damage(out)
        with pytest.raises(HFImportError, match=message):
            init_from_hf(Transformer(model.cfg), out)


def _edit_config(out: Path, drop: bool = False, **changes) -> None:
    config = json.loads((out / "config.json").read_text())
    if drop:
        del config["quantization_config"]
    config.get("quantization_config", {}).update(changes)
    (out / "config.json").write_text(json.dumps(config))


def test_bf16_export_writes_bf16_weights(tmp_path):
    model, out = export(tmp_path, "bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    tensors = file_tensors(out)
    for name, t in tensors.items():
        assert t.dtype == (torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16), name
    assert torch.equal(tensors["model.embed_tokens.weight"], model.embed_tokens.weight.detach().to(torch.bfloat16))
