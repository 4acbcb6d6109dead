"""Sampling from a trained model with MLA's latent KV cache: batched prompts, greedy or nucleus (top-p),
and greedy MTP speculative decoding.

Prompts of different lengths are left-padded onto one slot grid (models/kv_cache.py). The prompt is
prefilled with the training path; each later step decodes the new token(s) with the absorbed
projections over the cached latents. `use_cache=False` recomputes the whole prefix every step (the
reference the cache is checked against, and the benchmark's baseline).

Speculative decoding (`speculative_generate`): the MTP depths draft the next D tokens, the main model
verifies them in one pass, the longest agreeing prefix is kept plus the main model's own next token,
so greedy output is identical to plain greedy (V3 §2.2 "MTP in inference").

    python -m train.generate --checkpoint DIR --prompt TEXT [--speculative]
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch

from models.kv_cache import LatentKVCache, padded_mask, padded_positions
from models.transformer import Transformer, embed, output_logits, run_layers
from train.inference import load_for_inference


# ------------------------------------------------------------------------------------------ model passes
def main_forward(model: Transformer, ids: torch.Tensor, cache: LatentKVCache) -> torch.Tensor:
    """norm(h) [B, n, H] of the n new tokens ids [B, n], their latents stored in `cache`."""
    n = ids.shape[1]
    rope = model.rope(n, cache.positions(n))
    h = run_layers(model, embed(model, ids), rope, None, cache.attention_mask(n), cache)
    cache.advance(n)
    return model.norm(h)


def mtp_forward(model: Transformer, depth: int, h_prev: torch.Tensor, shifted_ids: torch.Tensor,
                cache: LatentKVCache) -> torch.Tensor:
    """h^depth [B, n, H] (MTP depth 1..D) at n new positions from h^{depth-1} and the tokens t_{i+depth}."""
    n = shifted_ids.shape[1]
    rope = model.rope(n, cache.positions(n))
    h = model.mtp[depth - 1](h_prev, embed(model, shifted_ids), rope, None, cache.attention_mask(n), cache.layer(0))
    cache.advance(n)
    return h


def recompute_last_logits(model: Transformer, ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Logits [B, V] of the last slot, recomputing the whole left-padded prefix ids [B, S] (no cache)."""
    seq = ids.shape[1]
    rope = model.rope(seq, padded_positions(pad, 0, seq))
    h = run_layers(model, embed(model, ids), rope, None, padded_mask(pad, 0, seq))
    return output_logits(model, h[:, -1])


def new_cache(model: Transformer, pad: torch.Tensor, capacity: int, n_layers: Optional[int] = None) -> LatentKVCache:
    return LatentKVCache(model.cfg, len(model.layers) if n_layers is None else n_layers, pad, capacity,
                         model.embed_tokens.weight.dtype)


def left_pad(prompts: list[list[int]], fill: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, P] with each prompt right-aligned, and pad [B] (slots before each prompt)."""
    if not prompts:
        raise ValueError("generate: no prompts")
    prompts = [list(p) or [fill] for p in prompts]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), fill, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
    pad = torch.tensor([width - len(p) for p in prompts], dtype=torch.long)
    return ids.to(device), pad.to(device)


@contextmanager
def eval_mode(model: Transformer) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def cut_at_eos(tokens: list[int], eos_id: Optional[int]) -> list[int]:
    return tokens[:tokens.index(eos_id)] if eos_id is not None and eos_id in tokens else tokens


# ------------------------------------------------------------------------------------------ sampling
@torch.no_grad()
def generate_batch(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 0.9,
    eos_id: Optional[int] = None,
    seed: int = 0,
    use_cache: bool = True,
) -> list[list[int]]:
    """Continue every prompt; temperature 0 = greedy. Returns each prompt's new tokens (up to eos)."""
    device = model.embed_tokens.weight.device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    ids, pad = left_pad(prompts, eos_id if eos_id is not None else 0, device)
    batch = ids.shape[0]
    new: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    with eval_mode(model):
        if use_cache:
            cache = new_cache(model, pad, ids.shape[1] + max_new_tokens)
            logits = model.lm_head(main_forward(model, ids, cache)[:, -1])
        for step in range(max_new_tokens):
            if not use_cache:
                logits = recompute_last_logits(model, ids, pad)
            next_ids = [_sample(logits[b].float().cpu(), temperature, top_p, generator) for b in range(batch)]
            for b, t in enumerate(next_ids):
                done[b] = done[b] or t == eos_id
                if not done[b]:
                    new[b].append(t)
            if all(done) or step == max_new_tokens - 1:
                break
            column = torch.tensor(next_ids, device=device).view(batch, 1)
            if use_cache:
                logits = model.lm_head(main_forward(model, column, cache)[:, -1])
            else:
                ids = torch.cat([ids, column], dim=1)
    return new


def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 0.9,
    eos_id: Optional[int] = None,
    seed: int = 0,
) -> list[int]:
    """Continue one prompt; temperature 0 = greedy. Returns only the new tokens."""
    return generate_batch(model, [prompt_ids], max_new_tokens, temperature, top_p, eos_id, seed)[0]


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = (logits / temperature).softmax(-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # smallest prefix with mass >= top_p
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])


# ------------------------------------------------------------------------------------------ speculation
@dataclass
class SpeculationStats:
    """Counts over the verification rounds of `speculative_generate` (summed over the batch's rows)."""

    rounds: int = 0  # main-model verification passes
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # drafts the main model agreed with (the longest agreeing prefix of each row)
    accepted_by_depth: list[int] = field(default_factory=list)  # [D]: drafts of depth k accepted
    tokens: int = 0  # tokens committed per row (the first one comes from the prefill)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)

    def depth_acceptance(self) -> list[float]:
        """Share of rounds in which the draft of depth k was accepted (k = 1: DeepSeek's 'second token')."""
        rows = self.drafted // max(len(self.accepted_by_depth), 1)
        return [a / max(rows, 1) for a in self.accepted_by_depth]


@torch.no_grad()
def speculative_generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: Optional[int] = None,
    depth: Optional[int] = None,
) -> tuple[list[list[int]], SpeculationStats]:
    """Greedy continuation of every prompt with the MTP depths 1..depth drafting (default: all).

    Slots: the main cache holds slots 0..m; t_{m+1} (not yet cached) is known. Each round, depth k
    runs over the positions j it has not committed, reading h^{k-1}_j and t_{j+k} (a draft where
    j + k > m + 1), and drafts t_{m+1+k}. The main model verifies [t_{m+1}, drafts] at once; rows
    advance together by the batch's shortest agreeing prefix plus the main model's next token, and
    every cache forgets the slots that read a rejected token.
    """
    n_mtp = len(model.mtp)
    depth = n_mtp if depth is None else depth
    if n_mtp == 0:
        raise ValueError("speculative decoding needs MTP modules: model.num_nextn_predict_layers is 0")
    if not 1 <= depth <= n_mtp:
        raise ValueError(f"speculative depth must be in [1, {n_mtp}] (the model's MTP depths), got {depth}")
    device = model.embed_tokens.weight.device
    ids, pad = left_pad(prompts, eos_id if eos_id is not None else 0, device)
    batch, width = ids.shape
    capacity = width + max_new_tokens + depth + 1
    stats = SpeculationStats(accepted_by_depth=[0] * depth)
    with eval_mode(model):
        main = new_cache(model, pad, capacity)
        drafters = [new_cache(model, pad, capacity, n_layers=1) for _ in range(depth)]
        seq = torch.zeros(batch, capacity + depth + 1, dtype=torch.long, device=device)
        seq[:, :width] = ids
        h0 = main_forward(model, ids, main)
        # hidden[k][:, j] = h^k at committed position j (read by depth k + 1)
        hidden = [h0.new_zeros(batch, capacity, h0.shape[-1]) for _ in range(depth)]
        hidden[0][:, :width] = h0
        seq[:, width] = model.lm_head(h0[:, -1]).argmax(-1)
        m, stats.tokens = width - 1, 1
        while stats.tokens < max_new_tokens and not _all_ended(seq[:, width:m + 2], eos_id):
            prev, prev_start = h0, 0
            for k in range(1, depth + 1):
                cache = drafters[k - 1]
                start = cache.length
                h_in = hidden[0][:, start:m + 1] if k == 1 else torch.cat([hidden[k - 1][:, start:prev_start], prev], 1)
                out = mtp_forward(model, k, h_in, seq[:, start + k:m + k + 1], cache)
                seq[:, m + 1 + k] = model.lm_head(out[:, -1]).argmax(-1)  # draft of t_{m+1+k}
                keep = m + 2 - k  # positions j <= m + 1 - k read committed tokens only
                if k < depth:
                    hidden[k][:, start:keep] = out[:, :keep - start]
                cache.truncate(keep)
                prev, prev_start = out, start
            verified = main_forward(model, seq[:, m + 1:m + 2 + depth], main)
            greedy = model.lm_head(verified).argmax(-1)  # greedy[:, i]: the main model's t_{m+2+i}
            agree = (seq[:, m + 2:m + 2 + depth] == greedy[:, :depth]).long().cumprod(1)
            accepted = int(agree.sum(1).min())
            stats.rounds += 1
            stats.drafted += batch * depth
            stats.accepted += int(agree.sum())
            for i in range(depth):
                stats.accepted_by_depth[i] += int(agree[:, i].sum())
            seq[:, m + 2 + accepted] = greedy[:, accepted]
            main.truncate(m + 2 + accepted)
            hidden[0][:, m + 1:m + 2 + accepted] = verified[:, :accepted + 1]
            m += 1 + accepted
            stats.tokens += 1 + accepted
    out_tokens = seq[:, width:width + min(stats.tokens, max_new_tokens)].tolist()
    return [cut_at_eos(row, eos_id) for row in out_tokens], stats


def _all_ended(new_tokens: torch.Tensor, eos_id: Optional[int]) -> bool:
    return eos_id is not None and bool((new_tokens == eos_id).any(1).all())


# ------------------------------------------------------------------------------------------ CLI
def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Print a sample from a moeforge checkpoint.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (RUN_DIR/checkpoints/step_N)")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative", action="store_true", help="greedy, MTP drafts verified by the model")
    args = p.parse_args(argv)
    model, tokenizer = load_for_inference(Path(args.checkpoint))
    prompt = tokenizer.encode(args.prompt)
    if args.speculative:
        (out,), stats = speculative_generate(model, [prompt], args.max_new_tokens, tokenizer.eos_id)
        print(f"MTP acceptance {stats.acceptance_rate:.1%} over {stats.rounds} rounds", file=sys.stderr)
    else:
        out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_p, tokenizer.eos_id, args.seed)
    print(args.prompt + tokenizer.decode(out))


if __name__ == "__main__":
    main()
