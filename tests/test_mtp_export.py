"""MTP heads from the exported weights: for depth-1 and depth-2 models, each head's logits computed
with the formula (final norm -> enorm / hnorm -> eh_proj -> block -> shared_head.norm -> shared head)
from the exported safetensors equal moeforge's within 1e-5 (fp32). The formula is written here;
the block is transformers' DeepseekV3DecoderLayer loaded with the exported layer's weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.transformer import embed, mtp_states, run_layers, shift_left
from tests.test_export import TOL, input_ids, save_synthetic_checkpoint, small_v3_config
from train.hf.write import export_checkpoint

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def exported_tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def hf_blocks(out: Path, n_layers: int):
    """transformers' DeepseekV3 model whose layer list also holds the MTP layers' blocks (HF index L + k)."""
    config = json.loads((out / "config.json").read_text())
    config["num_hidden_layers"] = n_layers
    hf_config = transformers.DeepseekV3Config(**{k: v for k, v in config.items() if k != "architectures"})
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), config=hf_config, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    return model.eval()


@pytest.mark.parametrize("depth", [1, 2])
@torch.no_grad()
def test_mtp_head_logits_from_exported_weights(depth, tmp_path):
    cfg = small_v3_config(num_nextn_predict_layers=depth)
    ours, checkpoint = save_synthetic_checkpoint(tmp_path / "run", cfg, seed=depth)
    out = export_checkpoint(checkpoint, tmp_path / "hf")
    w = exported_tensors(out)
    L, eps = cfg.num_hidden_layers, cfg.rms_norm_eps
    hf = hf_blocks(out, L + depth)
    ids = input_ids(cfg.vocab_size, seq=24)
    S = ids.shape[1]
    positions = torch.arange(S).expand(ids.shape[0], -1)
    causal = torch.full((S, S), torch.finfo(torch.float32).min).triu(1).expand(ids.shape[0], 1, S, S)

    def block(j: int, x: torch.Tensor) -> torch.Tensor:
        rope = hf.model.rotary_emb(x, positions)
        return hf.model.layers[j](x, attention_mask=causal, position_ids=positions, position_embeddings=rope)

    h = w["model.embed_tokens.weight"][ids]
    for j in range(L):
        h = block(j, h)
    h = rms_norm(h, w["model.norm.weight"], eps)  # h^0: the main model's output after its final norm
    theirs = []
    for k in range(1, depth + 1):
        p = f"model.layers.{L + k - 1}."
        emb = w[p + "embed_tokens.weight"][shift_left(ids, k, 0)]
        x = torch.cat([rms_norm(emb, w[p + "enorm.weight"], eps), rms_norm(h, w[p + "hnorm.weight"], eps)], -1)
        x = block(L + k - 1, x @ w[p + "eh_proj.weight"].T)
        h = rms_norm(x, w[p + "shared_head.norm.weight"], eps)  # depth k+1 reads what depth k's head reads
        theirs.append(h @ w[p + "shared_head.head.weight"].T)

    rope = ours.rope(S)
    h0 = ours.norm(run_layers(ours, embed(ours, ids), rope, None, None))
    mine = [ours.lm_head(h_k) for h_k in mtp_states(ours, h0, ids, rope, None, None)]
    assert len(mine) == depth
    for k, (a, b) in enumerate(zip(mine, theirs), start=1):
        assert float((a - b).abs().max()) <= TOL, f"MTP depth {k}"
    assert float((mine[0] - theirs[-1]).abs().max()) > 1e-3 or depth == 1  # the depths differ
