"""Activation recomputation (`train.recompute`), applied to the plain model from outside.

Modes (train.recompute):
  none       autograd keeps what every op saves (today's behaviour).
  selective  only the modules listed in train.recompute_modules are recomputed, each as below.
  full       every transformer block (train.recompute_num_layers = 0), or the blocks whose model position
             i (decoder layer index, then L + k for MTP depth k + 1) has i % N == 0 (N = recompute_num_layers),
             is recomputed in backward from its input, except the MoE token dispatch and combine (below).

Selective modules (train.recompute_modules), what is kept and what recomputed:
  layernorm       every RMSNorm (block input and post-attention norms, the MLA latent norms q_a_layernorm and
                  kv_a_layernorm, MTP enorm / hnorm / norm, the final norm). Kept: the norm's input. Dropped:
                  its output and its internals; whatever later saves the output (the next projection's input)
                  gets it recomputed from the kept input in backward (DeepSeek-V3 report §3.2.3).
  mla_up_proj     the MLA up-projections q_b_proj (q_proj when q_lora_rank is null) and kv_b_proj and the RoPE
                  application: their outputs q, k, v (the attention core's inputs) are dropped and recomputed
                  from the latents (the normed q / kv latents and the raw RoPE key), which stay kept (§3.2.3).
  moe_act         the routed experts' SwiGLU: its input (the gate|up projection output, [rows, 2I]) is kept,
                  its output ([rows, I], the down projection's input) dropped and recomputed (§3.3).
  core_attn       the attention core softmax(q k^T) v: kept q, k, v; dropped everything the kernel saves
                  beyond them (output, log-sum-exp, CPU's padded v, the eager path's probabilities).
                  With mla_up_proj too, the region starts at the latents: kept are the latents only.
  mlp             the dense SwiGLU MLP (first_k_dense_replace layers): kept its input, dropped its internals.
  shared_experts  the MoE shared experts' SwiGLU: kept its input, dropped its internals.

No collective is ever run again: see `apply_recompute` for how this is guaranteed.
"""

from __future__ import annotations

from typing import Sequence

MODES = ("none", "selective", "full")
MODULES = ("layernorm", "mla_up_proj", "moe_act", "core_attn", "mlp", "shared_experts")
# DeepSeek-V3's choice (report §3.2.3 and §3.3): every RMSNorm, the MLA up-projections, the SwiGLU output.
DEEPSEEK_V3_MODULES = ("layernorm", "mla_up_proj", "moe_act")


def check_recompute(mode: str, modules: Sequence[str], num_layers: int) -> None:
    """Raise ValueError naming the train.recompute* key and the fix."""
    if mode not in MODES:
        raise ValueError(f"train.recompute: must be {'|'.join(MODES)}, got {mode!r}")
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        raise ValueError(f"train.recompute_modules: unknown module {unknown[0]!r}; choose from {', '.join(MODULES)}")
    if len(set(modules)) != len(modules):
        raise ValueError(f"train.recompute_modules: lists a module twice: {list(modules)}")
    if mode == "selective" and not modules:
        raise ValueError("train.recompute_modules: train.recompute=selective needs at least one module "
                         f"(e.g. [{', '.join(DEEPSEEK_V3_MODULES)}]) or train.recompute=none")
    if num_layers < 0:
        raise ValueError(f"train.recompute_num_layers: must be >= 0 (0 = every block), got {num_layers}")
    if num_layers > 0 and mode != "full":
        raise ValueError(f"train.recompute_num_layers: applies to train.recompute=full only (got recompute={mode!r}); "
                         "set it to 0 or train.recompute=full")
