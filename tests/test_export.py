"""HF export (train/hf/write.py): a trained checkpoint -> a directory that transformers loads with
no missing keys and the same logits as moeforge (fp32, <= 1e-5), from single-process and
expert-parallel checkpoints, for a DeepSeek-V3 and a DeepSeek-V2-style model."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from models.config import ModelConfig, RopeScalingConfig
from models.transformer import Transformer, embed, mtp_states, run_layers, shift_left
from parallel.checkpointing import CheckpointState
from parallel.context import ParallelContext
from tests.distributed import run_ranks
from tests.parity_worker import train_and_report
from tests.test_parallel_parity import overrides as parity_overrides
from train import checkpoint as ckpt
from train.config import CheckpointConfig, load_config
from train.export import main
from train.hf.write import INDEX_FILE, export_checkpoint
from train.inference import load_for_inference
from train.trainer import Trainer

transformers = pytest.importorskip("transformers")

TOL = 1e-5
STEPS = 2


# ------------------------------------------------------------------------------------------ helpers


def input_ids(vocab: int, seq: int = 48, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_load(path: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    return model.eval(), info


@torch.no_grad()
def max_logit_diff(ours: Transformer, hf, ids: torch.Tensor) -> float:
    return float((ours.eval()(ids).logits - hf(ids).logits).abs().max())


def hf_in_memory_name(key: str) -> str:
    """transformers reports per-expert keys under its fused in-memory names."""
    key = re.sub(r"mlp\.experts\.\d+\.(gate|up)_proj\.weight$", "mlp.experts.gate_up_proj", key)
    return re.sub(r"mlp\.experts\.\d+\.down_proj\.weight$", "mlp.experts.down_proj", key)


def exported_keys(out: Path) -> list[str]:
    return list(json.loads((out / INDEX_FILE).read_text())["weight_map"])


def save_synthetic_checkpoint(run_dir: Path, cfg: ModelConfig, seed: int = 0) -> tuple[Transformer, Path]:
    """A checkpoint of a randomly initialised model with non-trivial norms and router biases."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if name.endswith("norm.weight"):
                t.add_(0.1 * torch.randn_like(t))
            elif name.endswith("e_score_correction_bias") and cfg.topk_method == "noaux_tc":
                t.copy_(0.05 * torch.randn_like(t))
            elif cfg.is_gpt_oss and (name.endswith("bias") or name.endswith("sinks")):  # zero-initialised
                t.copy_(0.1 * torch.randn_like(t))
    meta = {"step": 1, "config": {"model": OmegaConf.to_container(OmegaConf.structured(cfg))}}
    state = CheckpointState(model, None, ParallelContext.single())
    with warnings.catch_warnings():  # DCP: "torch.distributed is disabled ... single process"
        warnings.simplefilter("ignore", UserWarning)
        path = ckpt.Checkpointer(run_dir / "checkpoints", CheckpointConfig(keep_last=1), state).save(1, meta, {})
    return model.eval(), path


def small_v3_config(**extra) -> ModelConfig:
    values = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        max_position_embeddings=256, rope_scaling=None, initializer_range=0.02,
    )
    values.update(extra)
    return ModelConfig(**values)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("export_cache")


def run_overrides(run_dir: Path, cache_dir: Path, dp: int, **extra) -> list[str]:
    # The parity tests' settings: same global batches whatever the layout, biases moving (gamma 0.01).
    return parity_overrides(run_dir, cache_dir, dp, **{
        "train.steps": STEPS, "train.grad_accum_steps": 1, "checkpoint.at_end": "true", **extra})


@pytest.fixture(scope="module")
def single_export(tmp_path_factory, repo_root, cache_dir):
    """STEPS training steps in this process, checkpoint at the end, exported."""
    run_dir = tmp_path_factory.mktemp("single")
    cfg = load_config(repo_root / "configs" / "tiny.yaml", run_overrides(run_dir, cache_dir, dp=1, **{"train.threads": 2}))
    Trainer(cfg).fit()
    checkpoint = ckpt.resolve_checkpoint(run_dir)
    out = export_checkpoint(checkpoint, tmp_path_factory.mktemp("hf_single"))
    model, _ = load_for_inference(checkpoint)
    return checkpoint, out, model


# ------------------------------------------------------------------------------------------ tests


def test_export_layout_and_config(single_export):
    checkpoint, out, model = single_export
    cfg = model.cfg
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    for key in ("num_nextn_predict_layers", "scoring_func", "topk_method", "n_group", "topk_group",
                "routed_scaling_factor", "norm_topk_prob", "first_k_dense_replace", "q_lora_rank"):
        assert config[key] == getattr(cfg, key), key
    assert config["rope_interleave"] is True
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": cfg.rope_theta}
    assert config["dtype"] == "float32"
    keys = set(exported_keys(out))
    L, E = cfg.num_hidden_layers, cfg.n_routed_experts
    for e in (0, E - 1):
        for part in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.1.mlp.experts.{e}.{part}.weight" in keys
            assert f"model.layers.{L}.mlp.experts.{e}.{part}.weight" in keys  # the MTP block's experts
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    for name in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens",
                 "input_layernorm", "self_attn.q_a_proj", "mlp.gate"):
        assert f"model.layers.{L}.{name}.weight" in keys, name
    assert not any(".gate_up_proj" in k or k.startswith("mtp.") for k in keys)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / f).is_file()


def test_transformers_loads_export_with_equal_logits(single_export):
    checkpoint, out, ours = single_export
    hf, info = hf_load(out)
    L = ours.cfg.num_hidden_layers
    # Exactly the MTP layer is left out: transformers' DeepseekV3ForCausalLM has no MTP module (it ignores
    # model.layers.61.* silently for the real V3; at other depths it reports them as unexpected).
    mtp_keys = {hf_in_memory_name(k) for k in exported_keys(out) if k.startswith(f"model.layers.{L}.")}
    assert set(info["unexpected_keys"]) == mtp_keys
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"]
    ids = input_ids(ours.cfg.vocab_size)
    assert max_logit_diff(ours, hf, ids) <= TOL
    # The trained router biases were exported and steer selection in transformers too.
    biases = [b for n, b in hf.named_buffers() if n.endswith("e_score_correction_bias")]
    assert biases and max(float(b.abs().max()) for b in biases) > 0
    with torch.no_grad():
        reference = hf(ids).logits
        saved = [b.clone() for b in biases]
        for b in biases:
            b.zero_()
        without_bias = hf(ids).logits
        for b, s in zip(biases, saved):
            b.copy_(s)
    assert float((reference - without_bias).abs().max()) > 1e-3


def test_exported_tokenizer_loads(single_export):
    checkpoint, out, _ = single_export
    from data.tokenizer import TextTokenizer

    ours = TextTokenizer.from_dir(checkpoint.parent.parent / "tokenizer")
    theirs = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "def f(x):\n    return x + 1\n"
    assert theirs(text)["input_ids"] == ours.encode(text)
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == ours.eos_id == theirs.eos_token_id


def test_mtp_layer_matches_transformers_mtp(single_export):
    """transformers' MtpModel (speculative decoding) loads the exported MTP layer by its DeepSeek names."""
    modeling_layers = pytest.importorskip("transformers.modeling_layers")
    if not hasattr(modeling_layers, "MtpModel"):
        pytest.skip("this transformers has no MtpModel")
    _, out, ours = single_export
    hf, _ = hf_load(out)
    L = ours.cfg.num_hidden_layers
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{L}.*"]  # its MTP-key pattern is layer 61's
    mtp = modeling_layers.MtpModel.from_pretrained(hf).eval()
    ids = input_ids(ours.cfg.vocab_size)
    captured = {}

    def capture(module, args, output):
        captured["h"] = output

    hook = hf.model.norm.register_forward_hook(capture)
    with torch.no_grad():
        hf(ids)
        hook.remove()
        # MTP depth 1 reads the main model's last hidden state after the final norm (DESIGN §3).
        positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        h_theirs = mtp.forward_layer(0, captured["h"], positions, None, input_ids=shift_left(ids, 1, 0))
        theirs = mtp._project_to_logits(h_theirs)
        rope = ours.rope(ids.shape[1])
        h = ours.norm(run_layers(ours, embed(ours, ids), rope, None, None))
        mine = ours.lm_head(mtp_states(ours, h, ids, rope, None, None)[0])
    assert float((mine - theirs).abs().max()) <= TOL


@pytest.mark.multirank
def test_export_from_expert_parallel_checkpoint(single_export, tmp_path, cache_dir):
    """Saved under EP=2 x FSDP 2 (experts as [E/2] chunks per rank): same HF model as the checkpoint."""
    run_dir = tmp_path / "ep2"
    run_ranks(2, train_and_report, run_overrides(run_dir, cache_dir, dp=2, **{"parallel.dp_shard": 2, "parallel.ep": 2}))
    checkpoint = ckpt.resolve_checkpoint(run_dir)
    experts = ckpt.SafeFileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata[
        "model.layers.1.mlp.experts.gate_up_proj"]
    assert len(experts.chunks) == 2  # one [E/2, ...] chunk per EP rank: read one at a time
    out = export_checkpoint(checkpoint, tmp_path / "hf")
    ours, _ = load_for_inference(checkpoint)
    hf, info = hf_load(out)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    ids = input_ids(ours.cfg.vocab_size)
    assert max_logit_diff(ours, hf, ids) <= TOL
    # Same training as the single-process run (parity tolerance of the layout tests), same export.
    _, single_out, _ = single_export
    single_hf, _ = hf_load(single_out)
    with torch.no_grad():
        assert float((hf(ids).logits - single_hf(ids).logits).abs().max()) <= 1e-3


def test_v2_style_export_matches_transformers_deepseek_v2(tmp_path):
    """softmax router, group-limited greedy, no top-k normalisation, single q_proj, YaRN, no MTP:
    transformers' DeepseekV2 computes the same function (it never normalises top-k gates, which is
    why norm_topk_prob must be false here, and has no router bias)."""
    cfg = small_v3_config(
        scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False, routed_scaling_factor=2.0,
        q_lora_rank=None, bias_update_speed=0.0, num_nextn_predict_layers=0, n_shared_experts=2,
        rope_scaling=RopeScalingConfig(factor=4.0, original_max_position_embeddings=64, mscale=0.707, mscale_all_dim=0.707),
    )
    ours, checkpoint = save_synthetic_checkpoint(tmp_path / "run", cfg)
    out = export_checkpoint(checkpoint, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v2" and config["rope_parameters"]["rope_type"] == "yarn"
    assert not any("e_score_correction_bias" in k for k in exported_keys(out))
    hf, info = hf_load(out)
    assert type(hf).__name__ == "DeepseekV2ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert max_logit_diff(ours, hf, input_ids(cfg.vocab_size, seq=96)) <= TOL  # past the original 64 positions


def test_cli_dtype_and_shards(single_export, tmp_path, capsys):
    checkpoint, _, ours = single_export
    out = tmp_path / "hf_bf16"
    assert main(["--checkpoint", str(checkpoint.parent.parent), "--out", str(out), "--dtype", "bfloat16",
                 "--max-shard-size", "200KB"]) == 0
    assert "exported" in capsys.readouterr().out
    index = json.loads((out / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == sorted(p.name for p in out.glob("model-*.safetensors"))
    from safetensors import safe_open

    total = 0
    for f in files:
        with safe_open(str(out / f), framework="pt") as handle:
            for key in handle.keys():
                t = handle.get_tensor(key)
                assert index["weight_map"][key] == f
                assert t.dtype == (torch.float32 if key.endswith("e_score_correction_bias") else torch.bfloat16), key
                total += t.numel() * t.element_size()
    assert index["metadata"]["total_size"] == total
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_incomplete_checkpoint_is_refused(tmp_path, capsys):
    step = tmp_path / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.resolve_checkpoint(step)
    assert main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "no complete checkpoint" in capsys.readouterr().err
