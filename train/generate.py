"""Sampling from a trained model: greedy or nucleus (top-p), recomputing the prefix each step.

Recompute keeps the model free of cache plumbing; at demo sizes (a few hundred tokens)
it costs milliseconds per token. `python -m train.generate --checkpoint DIR --prompt ...`
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch

from models.transformer import Transformer
from train.inference import load_for_inference


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 0.9,
    eos_id: Optional[int] = None,
    seed: int = 0,
) -> list[int]:
    """Continue `prompt_ids`; temperature 0 = greedy. Returns only the new tokens."""
    was_training = model.training
    model.eval()
    device = model.embed_tokens.weight.device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    ids = list(prompt_ids) or [eos_id if eos_id is not None else 0]
    new: list[int] = []
    window = model.cfg.max_position_embeddings
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-window:]], device=device)
        logits = model(context).logits[0, -1].float().cpu()
        next_id = _sample(logits, temperature, top_p, generator)
        if eos_id is not None and next_id == eos_id:
            break
        ids.append(next_id)
        new.append(next_id)
    model.train(was_training)
    return new


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = (logits / temperature).softmax(-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # smallest prefix with mass >= top_p
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Print a sample from a moeforge checkpoint.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (RUN_DIR/checkpoints/step_N)")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    model, tokenizer = load_for_inference(Path(args.checkpoint))
    out = generate(
        model, tokenizer.encode(args.prompt), args.max_new_tokens, args.temperature, args.top_p, tokenizer.eos_id, args.seed
    )
    print(args.prompt + tokenizer.decode(out))


if __name__ == "__main__":
    main()
