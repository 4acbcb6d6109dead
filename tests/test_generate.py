"""Generation: greedy equals an argmax loop over full recomputation; the MLA latent cache holds exactly
(kv_lora_rank + qk_rope_head_dim) values per token and layer; greedy with the cache equals greedy
without it and transformers' generate on the exported model (4 prompts of different lengths, 64 new
tokens); MTP speculative greedy equals plain greedy; nucleus sampling is seeded and stays inside the
top-p mass; the CLIs print a sample and a held-out loss from a checkpoint."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from data.config import DataConfig, SourceConfig
from data.loader import TextBatchStream
from models import ModelConfig, Transformer
from models.rope import apply_rope
from tests.test_export import hf_load, save_synthetic_checkpoint, small_v3_config
from tests.trainer_helpers import small_overrides
from train.config import load_config
from train.evaluate import main as evaluate_main
from train.generate import _sample, generate, generate_batch, main_forward, new_cache, speculative_generate
from train.hf.write import export_checkpoint
from train.inference import load_for_inference
from train.trainer import Trainer


PROMPTS = [[3, 7, 1], [5] * 9, [60, 2], list(range(10, 30))]  # four lengths: 3, 9, 2, 20


def tiny_model(mtp: int = 1, max_positions: int = 64) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                      num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=8,
                      qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
                      num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                      max_position_embeddings=max_positions, rope_scaling=None, initializer_range=0.2,
                      num_nextn_predict_layers=mtp)
    return Transformer(cfg)


def drafting_model(mtp: int) -> Transformer:
    """A model whose MTP depths often guess right: the main model is close to a bigram model (its
    blocks' outputs scaled by 0.1) and each MTP depth maps Emb(t_{i+k}) through eh_proj = [I, 0] and a
    block whose outputs are zeroed, so it predicts the main model's bigram of t_{i+k}."""
    model = tiny_model(mtp, max_positions=128)
    hidden = model.cfg.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-2] in ("o_proj", "down_proj") or name.endswith("experts.down_proj"):
                p.mul_(0.0 if name.startswith("mtp.") else 0.1)
        for module in model.mtp:
            module.eh_proj.weight.copy_(torch.cat([torch.eye(hidden), torch.zeros(hidden, hidden)], 1))
    return model.eval()


def test_greedy_matches_argmax_loop():
    model = tiny_model()
    prompt = [3, 7, 1]
    got = generate(model, prompt, max_new_tokens=8, temperature=0.0)
    assert model.training  # generate() restores the mode it found
    ids = list(prompt)
    model.eval()
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert got == ids[len(prompt):]


def test_latent_cache_holds_exactly_the_latent_and_rope_key():
    """(kv_lora_rank + qk_rope_head_dim) x layers values per token; layer 0's entries are its c_KV and k^R."""
    model = tiny_model().eval()
    cfg = model.cfg
    ids = torch.tensor([[0, 0, 4, 9, 2], [1, 2, 3, 4, 5]])
    pad = torch.tensor([2, 0])
    cache = new_cache(model, pad, capacity=8)
    with torch.no_grad():
        main_forward(model, ids, cache)
        attn = model.layers["0"].self_attn
        x = model.layers["0"].input_layernorm(model.embed_tokens(ids))
        latent, k_pe = attn.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], -1)
        cos, sin = model.rope(5, torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]))  # left padding: 2 slots
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers
    assert cache.values_per_token() == per_token == 24
    assert cache.values.numel() == per_token * 2 * 8 and cache.length == 5
    stored = cache.values[0, :, :5]
    torch.testing.assert_close(stored[..., :cfg.kv_lora_rank], attn.kv_a_layernorm(latent))
    torch.testing.assert_close(stored[..., cfg.kv_lora_rank:], apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2))
    assert torch.equal(cache.positions(1), torch.tensor([[3], [5]]))  # next slot: position 3 after 3 real tokens
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        generate_batch(model, [[1, 2]], 63)


def test_batched_greedy_with_cache_equals_recompute():
    model = tiny_model()
    cached = generate_batch(model, PROMPTS, 40)
    assert cached == generate_batch(model, PROMPTS, 40, use_cache=False)
    assert cached == [generate(model, p, 40) for p in PROMPTS]  # one prompt at a time: no padding
    assert len({tuple(c) for c in cached}) == 4 and all(len(c) == 40 for c in cached)


@pytest.mark.parametrize("depth,drafting", [(2, False), (1, True), (2, True)], ids=["random-2", "drafting-1", "drafting-2"])
def test_speculative_greedy_equals_plain_greedy(depth, drafting):
    model = drafting_model(depth) if drafting else tiny_model(depth, max_positions=128)
    plain = generate_batch(model, PROMPTS, 40)
    spec, stats = speculative_generate(model, PROMPTS, 40)
    assert spec == plain
    assert stats.drafted == stats.rounds * len(PROMPTS) * depth
    one, stats_one = speculative_generate(model, PROMPTS[3:], 40)
    assert one == plain[3:]
    if drafting:  # drafts are accepted and rejected: both branches of the verification ran
        assert 0 < stats.accepted < stats.drafted and 0 < stats_one.accepted < stats_one.drafted
        assert stats_one.rounds < 39  # fewer main-model passes than tokens
    with pytest.raises(ValueError, match="speculative depth"):
        speculative_generate(model, PROMPTS, 4, depth=depth + 1)


def test_greedy_equals_transformers_generate_on_the_export(tmp_path):
    """Cache, no cache and transformers' generate (its own cache) agree on 64 new tokens per prompt."""
    cfg = small_v3_config(initializer_range=0.1)
    ours, checkpoint = save_synthetic_checkpoint(tmp_path / "run", cfg, seed=3)
    hf, _ = hf_load(export_checkpoint(checkpoint, tmp_path / "hf"))
    prompts = [[p * 17 % cfg.vocab_size for p in prompt] for prompt in PROMPTS]
    cached = generate_batch(ours, prompts, 64)
    assert cached == generate_batch(ours, prompts, 64, use_cache=False)
    with torch.no_grad():
        for prompt, mine in zip(prompts, cached):
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                              pad_token_id=0)
            assert out[0, len(prompt):].tolist() == mine


def test_sampling_is_seeded_and_respects_top_p():
    model = tiny_model()
    a = generate(model, [1, 2], 10, temperature=1.0, top_p=0.9, seed=5)
    b = generate(model, [1, 2], 10, temperature=1.0, top_p=0.9, seed=5)
    assert a == b
    logits = torch.tensor([5.0, 4.0, 0.0, -1.0])  # softmax mass of the first two ~0.98
    gen = torch.Generator().manual_seed(0)
    draws = {_sample(logits, 1.0, 0.5, gen) for _ in range(200)}
    assert draws == {0}  # top-p 0.5 keeps only the most likely token
    draws = {_sample(logits, 1.0, 0.95, gen) for _ in range(400)}
    assert draws <= {0, 1} and 1 in draws


def test_stops_at_eos():
    model = tiny_model()
    first = generate(model, [3], 1, temperature=0.0)[0]
    assert generate(model, [3], 5, temperature=0.0, eos_id=first) == []


@pytest.fixture(scope="module")
def finished_run(repo_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("gen_run")
    cfg = load_config(repo_root / "configs" / "tiny.yaml",
                      small_overrides(run, tmp_path_factory.mktemp("gen_cache"), **{"train.steps": 2}))
    trainer = Trainer(cfg)
    trainer.fit()
    return run, trainer


def test_load_for_inference_and_cli(finished_run, repo_root):
    run, trainer = finished_run
    step_dir = run / "checkpoints" / "step_00000002"
    model, tokenizer = load_for_inference(step_dir)
    for name, p in trainer.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], p, msg=name)
    out = subprocess.run(
        [sys.executable, "-m", "train.generate", "--checkpoint", str(step_dir), "--prompt", "def ",
         "--max-new-tokens", "8", "--temperature", "0"],
        capture_output=True, text=True, cwd=repo_root, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("def ")


def test_evaluate_cli_reports_held_out_loss(finished_run, tmp_path, capsys):
    """python -m train.evaluate: loss / perplexity over a .jsonl source equal a hand computation of the
    mean next-token CE over the same packed sequences; a missing source is refused by name."""
    run, _ = finished_run
    step_dir = run / "checkpoints" / "step_00000002"
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + 1\n"}) + "\n"
                                for i in range(40)))
    assert evaluate_main(["--checkpoint", str(step_dir), "--data", str(held_out), "--tokens", "256",
                          "--seq-len", "64", "--batch-size", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    model, tokenizer = load_for_inference(step_dir)
    stream = TextBatchStream(DataConfig(sources=[SourceConfig(path=str(held_out))]), tokenizer, 64, 2)
    ce, count = 0.0, 0
    with torch.no_grad():
        for batch in itertools.islice(stream, 2):
            logits = model(batch["input_ids"]).logits
            ce += float(F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum",
                                        ignore_index=-100))
            count += int((batch["labels"] != -100).sum())
    stream.close()
    assert report["tokens"] == count and report["batches"] == 2
    assert report["loss"] == pytest.approx(ce / count, rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(ce / count), rel=1e-5)
    assert len(report["mtp_losses"]) == model.cfg.num_nextn_predict_layers
    assert evaluate_main(["--checkpoint", str(step_dir), "--data", str(tmp_path / "missing.jsonl")]) == 1
    assert "missing.jsonl" in capsys.readouterr().err
