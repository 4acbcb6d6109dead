"""Small, fast trainer configurations shared by the trainer tests."""

from __future__ import annotations

from pathlib import Path

# A DeepSeek-V3-shaped model small enough to train a step in ~0.1 s on 2 CPU cores:
# MLA, 8 routed experts top-2 in 4 groups (2 kept), 1 shared expert, MTP depth 1.
SMALL_MODEL = [
    "model.vocab_size=512",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.moe_intermediate_size=32",
    "model.num_hidden_layers=2",
    "model.first_k_dense_replace=1",
    "model.num_attention_heads=4",
    "model.q_lora_rank=32",
    "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=16",
    "model.qk_rope_head_dim=8",
    "model.v_head_dim=16",
    "model.n_routed_experts=8",
    "model.num_experts_per_tok=2",
    "model.n_group=4",
    "model.topk_group=2",
    "model.max_position_embeddings=256",
]


# The gpt-oss counterpart (overrides on configs/tiny_gpt_oss.yaml): GQA 4 q / 2 kv heads with sinks,
# window 16 (< train.seq_len) on layer 0 and full attention on layer 1, 4 biased experts top-2.
SMALL_GPT_OSS = [
    "model.vocab_size=512",
    "model.hidden_size=64",
    "model.intermediate_size=32",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",
    "model.head_dim=16",
    "model.sliding_window=16",
    "model.num_local_experts=4",
    "model.num_experts_per_tok=2",
    "model.max_position_embeddings=256",
]


def small_overrides(run_dir: Path, cache_dir: Path, model: list[str] = SMALL_MODEL, **extra: object) -> list[str]:
    """Overrides on configs/tiny.yaml (or tiny_gpt_oss.yaml with model=SMALL_GPT_OSS): small model,
    small stdlib sample, no sample print."""
    base = model + [
        f"run.dir={run_dir}",
        f"data.cache_dir={cache_dir}",
        "data.tokenizer_vocab_size=512",
        "data.max_files=40",
        "data.shuffle_buffer=0",  # file order, as the tests were written (tiny.yaml shuffles for the demo)
        "train.seq_len=64",
        "train.micro_batch_size=4",
        "train.steps=6",
        "train.log_interval=1",
        "train.sample_prompt=''",
        "optim.warmup_steps=2",
        "checkpoint.interval=0",
        "log.progress=false",
    ]
    return base + [f"{k}={v}" for k, v in extra.items()]
