"""Sampling utility: greedy equals an argmax loop over full recomputation; nucleus sampling is
seeded and stays inside the top-p mass; the CLI prints a sample from a checkpoint."""

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
from tests.trainer_helpers import small_overrides
from train.config import load_config
from train.evaluate import main as evaluate_main
from train.generate import _sample, generate
from train.inference import load_for_inference
from train.trainer import Trainer


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                      num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=8,
                      qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
                      num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                      max_position_embeddings=64, rope_scaling=None, initializer_range=0.2)
    return Transformer(cfg)


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
