"""Generation on CPU: MLA latent cache vs recomputation, cache size, MTP speculative decoding.

For the tiny model (configs/tiny.yaml) and one wider config, random init, fp32, batch 1:
  decode tok/s   N decode steps after a prompt of 128 / 512 / 1024 tokens, with the latent cache
                 (absorbed projections) and recomputing the whole prefix per token
  cache B/token  the latent cache, (kv_lora_rank + qk_rope_head_dim) x layers values, next to a
                 multi-head cache of the same model (n_h (d_nope + d_rope) keys + n_h d_v values per layer)
  speculative    MTP acceptance rate (share of drafts the main model verified) and the speed-up of
                 speculative greedy over plain cached greedy, on random init and, with --checkpoint,
                 on a trained checkpoint (e.g. a short `python -m train --config configs/tiny.yaml` run)

python bench/generate.py [--steps 16] [--new-tokens 128] [--threads 2] [--checkpoint RUN_DIR/checkpoints/step_N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from models.config import ModelConfig
from models.transformer import Transformer
from train.config import load_config
from train.generate import generate_batch, main_forward, new_cache, recompute_last_logits, speculative_generate
from train.inference import load_for_inference

REPO = Path(__file__).resolve().parent.parent
CONTEXTS = (128, 512, 1024)
CODE_PROMPTS = ("import os\nimport sys\n\n\ndef main(argv):\n    ", "class Foo:\n    def __init__(self, x):\n        self.",
                "def ")


def tiny_config() -> ModelConfig:
    cfg = load_config(REPO / "configs" / "tiny.yaml").model
    cfg.max_position_embeddings = 2048  # RoPE table only: room for 1024 tokens of context plus the decoded ones
    return cfg


def wide_config() -> ModelConfig:
    """Four times the tiny model's width in attention and experts (DeepSeek-V2-Lite-like ratios)."""
    return ModelConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=256,
                       num_hidden_layers=4, num_attention_heads=16, q_lora_rank=384, kv_lora_rank=256,
                       qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32,
                       num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
                       max_position_embeddings=2048, rope_scaling=None, initializer_range=0.02)


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def decode_rates(model: Transformer, context: int, steps: int) -> tuple[float, float]:
    """tok/s of `steps` greedy decode steps after a `context`-token prompt: (latent cache, recompute)."""
    ids = torch.randint(0, model.cfg.vocab_size, (1, context))
    pad = torch.zeros(1, dtype=torch.long)
    cache = new_cache(model, pad, context + steps)
    last = model.lm_head(main_forward(model, ids, cache)[:, -1]).argmax(-1, keepdim=True)

    def cached() -> None:
        nonlocal last
        for _ in range(steps):
            last = model.lm_head(main_forward(model, last, cache)[:, -1]).argmax(-1, keepdim=True)

    seq = ids

    def recompute() -> None:
        nonlocal seq
        for _ in range(steps):
            seq = torch.cat([seq, recompute_last_logits(model, seq, pad).argmax(-1, keepdim=True)], 1)

    return steps / timed(cached), steps / timed(recompute)


def cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2) -> tuple[int, int]:
    """(latent cache, multi-head cache) bytes per token over the main layers, bf16 entries."""
    latent = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers
    mha = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers
    return latent * dtype_bytes, mha * dtype_bytes


@torch.no_grad()
def speculation(model: Transformer, prompt: list[int], new_tokens: int) -> tuple[float, float, float, bool]:
    """(acceptance rate, tokens per main-model pass, speed-up over cached greedy, outputs equal)."""
    plain: list[list[int]] = []
    spec: list[list[int]] = []
    stats = None

    def run_plain() -> None:
        plain[:] = generate_batch(model, [prompt], new_tokens)

    def run_spec() -> None:
        nonlocal stats
        out, stats = speculative_generate(model, [prompt], new_tokens)
        spec[:] = out

    t_plain, t_spec = timed(run_plain), timed(run_spec)
    return stats.acceptance_rate, stats.tokens / (stats.rounds + 1), t_plain / t_spec, plain == spec


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=16, help="decode steps timed per context length")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated in the speculative comparison")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint", default=None, help="a trained checkpoint for the speculative rows")
    p.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"CPU fp32, batch 1, {args.threads} threads; decode: {args.steps} steps after the context")
    print(f"{'model':<8}{'context':>8}{'cache tok/s':>13}{'recompute tok/s':>17}{'speed-up':>10}")
    models = {"tiny": Transformer(tiny_config()).eval(), "wide": Transformer(wide_config()).eval()}
    for name, model in models.items():
        for context in args.contexts:
            cached, recomputed = decode_rates(model, context, args.steps)
            print(f"{name:<8}{context:>8}{cached:>13.1f}{recomputed:>17.1f}{cached / recomputed:>9.1f}x")
    print(f"\n{'model':<8}{'latent B/token':>16}{'MHA B/token':>13}{'ratio':>8}   (bf16, all main layers)")
    for name, model in models.items():
        latent, mha = cache_bytes_per_token(model.cfg)
        print(f"{name:<8}{latent:>16}{mha:>13}{mha / latent:>7.1f}x")
    print(f"\n{'model':<26}{'accept':>8}{'tok/pass':>10}{'speed-up':>10}  same output  ({args.new_tokens} new tokens)")
    prompt = list(range(1, 33))
    rows = [(f"{n} (random init)", m, prompt) for n, m in models.items()]
    if args.checkpoint:
        trained, tokenizer = load_for_inference(Path(args.checkpoint))
        for i, text in enumerate(CODE_PROMPTS):
            rows.append((f"tiny {Path(args.checkpoint).name} p{i}", trained, tokenizer.encode(text)))
    for name, model, ids in rows:
        rate, per_pass, speedup, same = speculation(model, ids, args.new_tokens)
        print(f"{name:<26}{rate:>8.1%}{per_pass:>10.2f}{speedup:>9.2f}x  {same}")

if __name__ == "__main__":
    main()
