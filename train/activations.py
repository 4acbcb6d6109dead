"""Bytes autograd saves for backward, per token, per layer kind: the planner's activation term, term by term.

Every term is a tensor the code saves (checked against train/memory_probe.py's count of saved storages,
each counted once, in tests/test_plan_measured.py). Notation: c = compute-dtype bytes (4 fp32, 2 bf16/fp8);
r = bytes of a block's residual stream (4 in the main stack, where the fp32 embedding output promotes every
residual add; c in an MTP block, whose stream starts at eh_proj's compute-dtype output); sc(K) = 4 *
ceil(K / 128), the fp32 1x128 tile scales of one FP8 row.

  RMSNorm of width W     its input as fp32 (the input itself, or the x.float() copy of a bf16 input; a norm
                         reading a split view saves the whole storage), rstd (4) and x * rstd (4W).
  Linear input           fp32: the input itself; bf16: autocast's cast copy, one per Linear -- unless the
                         input is already bf16, when every Linear saves that one storage; fp8: each Linear
                         its own quantised copy, K + sc(K) (models/fp8.py saves FP8 inputs, §3.3.3).
  attention (MLA)        input norm; normed x read by q_a (or q_proj) and kv_a_proj; q_a_layernorm and
                         q_b_proj's input; kv_a_layernorm and kv_b_proj's input; RoPE's complex cos/sin
                         tables for q and k (4 dr bytes per position each: per token, / micro-batch size);
                         the attention core's q, k, v (v padded to d_qk where d_v < d_qk: CPU SDPA and
                         flash-attn both pad; unpadded, v is a view of kv_b's output, whose whole storage
                         stays), its output (padded too) and log-sum-exp (4 per head); o_proj's input
                         (nh d_v: its own copy when the output is padded or under FP8, else the output).
  dense MLP (SwiGLU)     post-attention norm; normed x read by gate and up; gate and up outputs, silu(gate)
                         (all c); down_proj's input.
  MoE                    post-attention norm; the router's fp32 input (4H), sigmoid scores (4E), top-k ids
                         (8k) and weights (4k + 4 for their sum); two int64 index vectors over the k
                         routed copies (dispatch order, token of each row -- combine's sum per token keeps
                         the same one: 16k) and the gate of every row (4k); per routed copy: the rows the
                         grouped GEMM saves (4H fp32, 2H bf16 cast, or H + sc(H) FP8), the gate|up output
                         (2I c) and the gated SwiGLU output (I c, or I + sc(I) FP8). No expert output: the
                         gates are applied to the down projection's input (models/moe.py); the shared
                         experts as a SwiGLU of width n_shared I on the same normed x; the sequence-wise
                         balance loss (normalised scores 4E, their sum 4, token ids 8) when an alpha > 0.
  gpt-oss                GQA attention (gqa_attention_terms) and, in the MoE block, the softmax router and the
                         clamped experts' fp32 gate|up output + bias (moe_terms).
  MTP module (extra)     enorm on the fp32 embedding, hnorm (on the final norm's fp32 output),
                         eh_proj's input (2H), its final norm (on the block's c-byte output); its block as
                         above with r = c.
  head                   final norm; the fused head+CE (models/head_loss.py) saves only grad_h (T H in
                         the normed h's dtype) and grad_W (V H fp32, per micro-batch, not per token), once
                         for the main head and once per MTP depth; where it does not apply (TP, an FP8
                         head) the plain path saves the head's input and the fp32 log-softmax (4V).
  embedding              the token ids (8 per token), for the main input and every MTP depth.

Tensor parallelism (tp > 1; a rank's bytes per token of the whole micro-batch, measured on a TP2 rank):
  split over tp          what runs per head or per column: the attention core's q, k, v, output and lse,
                         o_proj's input, the SwiGLU widths (gate, up, silu, down's input) of dense MLPs
                         and shared experts, the head's log-softmax (4V / tp, vocab-parallel CE).
  whole                  what the column-parallel projections read: MLA's latents and their norms (q_b,
                         kv_b), RoPE's tables, the SwiGLU input, the head's input and labels; a plain-TP
                         head saves its input as it is, so MTP's hnorm input (the final norm's output)
                         is counted there.
  sequence-split (SP)    with parallel.sequence_parallel everything between the TP regions is split over
                         tp: the norms and residuals, the down-projections' input (q_a / kv_a; without
                         q_lora MLA gathers at its input, which q_proj and kv_a then save whole), the
                         router, the dispatch and the routed experts, MTP's enorm / hnorm / eh_proj, a
                         recomputed block's input; the SwiGLU input is its all-gathered copy (a new
                         storage, so fp32 shared experts no longer share the router's input), and the
                         vocab-parallel lookup saves an fp32 mask of its rows (4 per token, per lookup).
  layernorm              a column-parallel projection reading a norm's output through a new tensor
                         (plain TP's DTensor of it, SP's all-gather) keeps it (q_b / kv_b not when
                         mla_up_proj and core_attn recompute them with the core).
  mlp, shared_experts    their region keeps its input (under SP the gathered one, whole) and the result
                         of down_proj's collective (row_parallel_output).
  full                   a region's TP collectives are recorded to be replayed, not rerun, so their results
                         stay: plain TP the all-reduced o_proj / down_proj outputs (H c each); SP the
                         gathered latents (or the input) twice (the gathered buffer and its reordered
                         copy), o_proj's and down_proj's reduce-scatter outputs (H c / tp), a dense MLP's
                         gathered input twice, the shared experts' gathered input (their region's input).

Recomputation (parallel/recompute.py's semantics, train.recompute):
  layernorm      a norm keeps only its input (its own bytes); its output and internals are recomputed, so a
                 projection that saves the output as it is keeps nothing, one that saves its own copy
                 (a bf16 cast, an FP8 quantised input) keeps that copy.
  mla_up_proj    q, k, v of the attention core (and v's padded copy) are recomputed from the latents: kept
                 are RoPE's tables, the raw RoPE key (kv_a's output) and the latents themselves
                 where no projection saves them as they are (FP8 saves quantised copies).
  core_attn      the core's output, log-sum-exp and padded v are recomputed; q, k and the unpadded v (a
                 view of kv_b's output: that whole storage) are kept. With mla_up_proj: nothing of it kept,
                 nor the up-projections' own (FP8) input copies and RoPE's tables (one region from the latents).
  moe_act        the routed SwiGLU output is recomputed from the kept gate|up output (c bytes). Under fp8
                 the kept gate|up output is its FP8 copy (2I + sc(2I), report §3.3.3) and the down
                 projection's FP8 copy of the SwiGLU output is recomputed too.
  mlp            a dense MLP keeps only its normed input.
  shared_experts the shared experts keep only their (already saved) normed input.
  full           a recomputed block keeps its input (H r); a MoE block, split at the dispatcher so that no
                 collective is inside a region, also keeps what runs outside its regions (full_moe_kept:
                 the dispatched rows among them); while a block
                 recomputes, its full activations live once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models.fp8 import Fp8GroupedGemm

KINDS = ("embedding", "attention", "dense_mlp", "moe", "head", "mtp")


@dataclass(frozen=True)
class Recompute:
    """What is recomputed: mode none | selective | full, the selective modules, full's every-N-th block."""

    mode: str = "none"
    modules: frozenset = field(default_factory=frozenset)
    num_layers: int = 0

    @classmethod
    def from_config(cls, train_cfg: Any) -> "Recompute":
        modules = frozenset(train_cfg.recompute_modules) if train_cfg.recompute == "selective" else frozenset()
        return cls(train_cfg.recompute, modules, train_cfg.recompute_num_layers)

    def has(self, module: str) -> bool:
        return module in self.modules

    def full_block(self, position: int) -> bool:
        """Is the block at model position `position` (layers, then L + k for MTP depth k + 1) recomputed whole?"""
        return self.mode == "full" and (self.num_layers == 0 or position % self.num_layers == 0)


class ActivationModel:
    """Saved bytes per token of each part of the model for one precision and recomputation (see the module doc)."""

    def __init__(self, model_cfg: Any, precision: str, recompute: Recompute = Recompute(), micro_batch_size: int = 1,
                 tp: int = 1, fp8_head: bool = False, sequence_parallel: bool = False) -> None:
        self.mc, self.precision, self.rc = model_cfg, precision, recompute
        self.c = 4 if precision == "fp32" else 2
        self.fp8 = precision == "fp8"
        self.micro_batch_size = micro_batch_size
        self.fused_head = tp == 1 and not fp8_head  # models.head_loss.fused_head_applies
        self.fp8_head = fp8_head
        self.tp = tp  # heads and column widths split over it
        self.seq = tp if sequence_parallel and tp > 1 else 1  # the stream between TP regions split over it

    # ------------------------------------------------------------ building blocks
    @staticmethod
    def _sc(k: int) -> int:
        return 4 * -(-k // 128)

    def linear_inputs(self, k: int, readers: int, source_bytes: int) -> float:
        """What `readers` Linears save of one K-wide input whose elements have `source_bytes` bytes."""
        if self.fp8:
            return readers * (k + self._sc(k))
        if source_bytes == self.c:  # already in the compute dtype: one storage for all
            return k * self.c
        return readers * k * self.c

    def norm(self, width: int, in_bytes: int, storage: int = 0) -> float:
        """An RMSNorm of `width` on an input of `in_bytes` per element (`storage`: the whole storage it views)."""
        if self.rc.has("layernorm"):  # its input as it is (a view keeps its whole storage)
            return float((storage or width) * in_bytes)
        kept_input = (storage or width) * 4 if in_bytes == 4 else width * 4  # the input, or its x.float() copy
        return float(kept_input + 4 + 4 * width)

    def _normed_inputs(self, k: int, readers: int, source_bytes: int, wrapped: bool = False) -> float:
        """Projections reading a norm's output. Under `layernorm` the output itself is recomputed, so a
        Linear that saves it as it is keeps nothing; one that saves its own copy (bf16 cast, FP8) keeps it, and
        so does one that reads it through a new tensor (`wrapped`: the column-parallel projection's DTensor
        of plain TP, or SP's all-gathered full sequence)."""
        if self.rc.has("layernorm") and not self.fp8 and source_bytes == self.c and not wrapped:
            return 0.0
        return self.linear_inputs(k, readers, source_bytes)

    # ------------------------------------------------------------ layer kinds
    def attention_terms(self, r: int) -> dict[str, float]:
        """Per-token bytes of one MLA block part, by what saves them."""
        mc, c = self.mc, self.c
        H, nh, dqk, dv, dn, dr = (mc.hidden_size, mc.num_attention_heads, mc.qk_head_dim, mc.v_head_dim,
                                  mc.qk_nope_head_dim, mc.qk_rope_head_dim)
        kv = mc.kv_lora_rank
        padded = dv < dqk
        up_proj, core = self.rc.has("mla_up_proj"), self.rc.has("core_attn")
        # both: one region from the latents (parallel/recompute.py's attend): the up-projections' own input
        # copies and RoPE's tables inside it are recomputed too
        region = up_proj and core
        readers = 1 if region and not mc.q_lora_rank else 2  # q_proj (no query compression) inside the region
        # under SP the stream is a sequence shard (/seq) up to the gather: after q_a / kv_a with a query latent,
        # else at the attention's input (q_proj and kv_a then read the full sequence)
        gathered_input = self.seq if mc.q_lora_rank else 1
        # q_b / kv_b read plain TP's DTensor of the normed latent (outside the region, which keeps none of it)
        tp_wraps_latents = self.tp > 1 and self.seq == 1 and not region
        t = {"input norm": self.norm(H, r) / self.seq,
             "q_a/kv_a inputs": self._normed_inputs(H, readers, r, wrapped=self.tp > 1 and not mc.q_lora_rank)
             / gathered_input}
        if mc.q_lora_rank:
            t["q latent norm + q_b input"] = (self.norm(mc.q_lora_rank, c) + (
                0 if region else self._normed_inputs(mc.q_lora_rank, 1, c, tp_wraps_latents)))
        # kv_a_layernorm reads a split view of kv_a's output [kv_lora + d_rope]
        t["kv latent norm + kv_b input"] = (self.norm(kv, c, storage=kv + dr)
                                            + (0 if region else self._normed_inputs(kv, 1, c, tp_wraps_latents)))
        v_bytes = nh * (dqk if padded else dn + dv) * c  # padded: its own storage; else a view of kv_b's output
        if not region:
            t["RoPE tables"] = 2 * 4 * dr / self.micro_batch_size  # complex64 cos/sin [S, dr/2] of q and k
        if up_proj:  # q, k, v and the core's padded copy of v recomputed from the latents
            if c != 4 and not self.rc.has("layernorm"):  # (fp32 / layernorm: the kv norm keeps that storage)
                t["raw RoPE key (kv_a output)"] = (kv + dr) * c
            if not self.rc.has("layernorm"):  # the recomputation's inputs, where no projection saves them as they are
                # (w, bytes, also saved as it is outside a region): a norm's output read only by an up-projection;
                # the normed x without query compression, which kv_a saves as it is when it is in the compute dtype
                latents = (((mc.q_lora_rank, c, region) if mc.q_lora_rank else (H, r, False)), (kv, c, region))
                t["up-projection inputs"] = sum(w * nb for w, nb, kept in latents if kept or self.fp8 or nb != c)
        else:
            t["core q, k"] = 2 * nh * dqk * c / self.tp
            t["core v"] = (nh * (dn + dv) * c if core else v_bytes) / self.tp  # core_attn keeps the unpadded view
        # o_proj's input: its own copy (of the padded output's first d_v, or FP8), else the core's output itself
        own_o_input = padded or self.fp8
        if not core:
            t["core output + lse"] = (nh * (dqk if padded else dv) * c + 4 * nh) / self.tp
        elif not own_o_input:
            t["core output + lse"] = nh * dv * c / self.tp  # the output stays: o_proj saves it
        if own_o_input:
            t["o_proj input"] = self.linear_inputs(nh * dv, 1, c) / self.tp
        return t

    def gqa_attention_terms(self, r: int) -> dict[str, float]:
        """Per-token bytes of one gpt-oss attention (models/gqa_attention.py; mla_up_proj / core_attn do not
        apply): q, k, v with k and v repeated to every query head, the output (sink-weighted) and two fp32
        per-head rows (log-sum-exp, sink weights), o_proj's own copy of the transposed output."""
        mc, c = self.mc, self.c
        H, nh, hd = mc.hidden_size, mc.num_attention_heads, mc.head_dim
        return {"input norm": self.norm(H, r), "q/k/v inputs": self._normed_inputs(H, 3, r),
                "core q, k, v": 3 * nh * hd * c, "core output + lse + sink weights": nh * hd * c + 8 * nh,
                "o_proj input": self.linear_inputs(nh * hd, 1, c)}

    def attention(self, r: int) -> float:
        terms = self.gqa_attention_terms(r) if self.mc.is_gpt_oss else self.attention_terms(r)
        return float(sum(terms.values()))

    def swiglu(self, width: int, input_bytes: int, readers_saved: bool = True) -> float:
        """A SwiGLU MLP of `width` on a normed H-wide input of `input_bytes` (gate, up, silu, down's input); the
        input is the full sequence (gathered under SP), the width split over tp (column-parallel gate / up)."""
        b = self._normed_inputs(self.mc.hidden_size, 2, input_bytes, wrapped=self.tp > 1) if readers_saved else 0.0
        return b + (3 * width * self.c + self.linear_inputs(width, 1, self.c)) / self.tp

    def dense_mlp(self, r: int) -> float:
        H = self.mc.hidden_size
        if self.rc.has("mlp"):  # its region keeps its input (under SP the gathered one, whole: no norm output)
            kept_input = 0.0 if self.rc.has("layernorm") and self.seq == 1 else H * r
            return self.norm(H, r) / self.seq + kept_input + self.row_parallel_output()
        return self.norm(H, r) / self.seq + self.swiglu(self.mc.intermediate_size, r)

    def row_parallel_output(self) -> float:
        """Under TP, the output of a row-parallel projection (o_proj, down_proj) inside a recompute region: the
        region records the all-reduced (plain TP) or reduce-scattered (SP) result to replay it, not rerun it."""
        return 0.0 if self.tp == 1 else float(self.mc.hidden_size * self.c / self.seq)

    def moe_terms(self, r: int) -> dict[str, float]:
        """Per-token bytes of one MoE block part, by what saves them."""
        mc, c = self.mc, self.c
        H, I, k, E = mc.hidden_size, mc.moe_intermediate_size, mc.num_experts_per_tok, mc.n_routed_experts
        # the router's fp32 input: the norm's output itself in the main stack (recomputed under layernorm),
        # else its own x.float() copy
        router_input = 0 if (self.rc.has("layernorm") and r == 4) else 4 * H
        t = {"norm": self.norm(H, r),
             "router": router_input + 4 * E + 8 * k + 4 * k + 4,  # input, scores, top-k ids, weights, their sum
             "dispatch/combine indices": 16 * k + 4 * k}  # two int64 index vectors, row gates
        t["routed rows (grouped GEMM input)"] = k * (H + self._sc(H) if self.fp8 else H * c)
        if mc.is_gpt_oss:
            # softmax router: no sum of the weights; clamped experts with biases: the gate|up output plus its
            # fp32 bias is fp32 (and the bias's row index, int64), the gated activation fp32 too, which the
            # down GEMM saves as it is (fp32) or as its own bf16 / FP8 copy (which moe_act cannot drop)
            t["router"] -= 4
            t["routed SwiGLU input"] = k * (2 * I * 4 + 8)
            if not (self.rc.has("moe_act") and c == 4):
                t["routed SwiGLU output"] = k * (I + self._sc(I) if self.fp8 else I * c)
        elif self.rc.has("moe_act") and self.fp8:  # only the FP8 copy of the gate|up output (models/fp8.py)
            t["routed SwiGLU input"] = k * (2 * I + self._sc(2 * I))
        else:  # the gate|up output; the SwiGLU output unless moe_act recomputes it
            t["routed SwiGLU input"] = k * 2 * I * c
            if not self.rc.has("moe_act"):
                t["routed SwiGLU output"] = k * (I + self._sc(I) if self.fp8 else I * c)
        if mc.aux_loss_alpha or mc.device_aux_loss_alpha or mc.comm_aux_loss_alpha:
            t["balance loss"] = 4 * E + 4 + 8
        t = {name: b / self.seq for name, b in t.items()}  # norm, router and routed experts: on the sequence shard
        if mc.n_shared_experts and not self.rc.has("shared_experts"):
            # fp32: gate/up read the router's input storage (counted) -- unless SP gathers it first (a new
            # full-sequence storage); else each its cast / FP8 copy
            shares_router_input = c == 4 and r == 4 and self.seq == 1 and not (self.tp > 1 and self.rc.has("layernorm"))
            t["shared experts"] = self.swiglu(mc.n_shared_experts * I, r, readers_saved=not shares_router_input)
        elif mc.n_shared_experts:  # recomputed: their region keeps its input and its TP collective's result
            if self.seq > 1:  # the gathered input, whole
                kept_input = H * r
            else:  # the main stack's is the router's input
                kept_input = H * r if r != 4 and not self.rc.has("layernorm") else 0.0
            t["shared experts"] = kept_input + self.row_parallel_output()
        return t

    def moe(self, r: int) -> float:
        return float(sum(self.moe_terms(r).values()))

    def full_moe_kept(self, r: int) -> float:
        """What a MoE block recomputed in full keeps besides its input: parallel/recompute.py splits it at the
        dispatcher (no collective inside a region), so the post-attention residual (the norm's input), the
        router's saves (its input only if it is a copy), the indices and row gates, and the dispatched rows
        (the experts' region input, what EP's all-to-all received: in the stream's dtype, or under fp8 the FP8
        rows and their scales, models/fp8.py's QuantisedRows) stay; combine keeps only its index (the gates
        are applied inside the experts' region)."""
        mc = self.mc
        H, k, E = mc.hidden_size, mc.num_experts_per_tok, mc.n_routed_experts
        rows = H + self._sc(H) if self.fp8 and Fp8GroupedGemm.quantised_dispatch else H * r
        b = H * r + (4 * H if r != 4 else 0) + 4 * E + 12 * k + 4 + 20 * k + k * rows
        if mc.aux_loss_alpha or mc.device_aux_loss_alpha or mc.comm_aux_loss_alpha:
            b += 4 * E + 4 + 8
        return float(b)

    def full_tp_kept(self, moe: bool, r: int) -> tuple[float, float]:
        """(attention part, MLP / MoE part): what a block recomputed in full keeps under TP besides
        full_moe_kept -- the results of the TP collectives inside its regions, which parallel/recompute.py
        records in forward to replay them (an all-gather along the sequence keeps two storages: the gathered
        buffer and its reordered copy), and under SP the shared experts' gathered input (their region's)."""
        if self.tp == 1:
            return 0.0, 0.0
        mc, c, H = self.mc, self.c, self.mc.hidden_size
        row_out = self.row_parallel_output()  # o_proj's, down_proj's
        if self.seq == 1:  # plain TP: only the all-reduced outputs
            return row_out, row_out if (mc.n_shared_experts or not moe) else 0.0
        gathered = (mc.q_lora_rank + mc.kv_lora_rank + mc.qk_rope_head_dim) * c if mc.q_lora_rank else H * r
        attention = 2 * gathered + row_out  # the latents (or the input) gathered
        if moe:
            return attention, (H * r + row_out) if mc.n_shared_experts else 0.0
        return attention, 2 * H * r + row_out  # the SwiGLU input gathered

    def block(self, moe: bool, position: int, mtp: bool = False) -> float:
        """A transformer block at model `position`, per token (MTP's block has the c-byte stream)."""
        r = self.c if mtp else 4
        if self.rc.full_block(position):  # its input, and a MoE block's saves outside the regions (on the shard)
            kept = (self.mc.hidden_size * r + (self.full_moe_kept(r) if moe else 0.0)) / self.seq
            return kept + sum(self.full_tp_kept(moe, r))
        return self.block_whole(moe, mtp)

    def block_whole(self, moe: bool, mtp: bool = False) -> float:
        """A block's activations when nothing of it is recomputed whole (also: one block while it recomputes)."""
        r = self.c if mtp else 4
        return self.attention(r) + (self.moe(r) if moe else self.dense_mlp(r))

    def mtp_extra(self) -> float:
        """enorm, hnorm, eh_proj's input and the final norm of one MTP module."""
        H = self.mc.hidden_size
        # hnorm reads the final-normed state (fp32, models/transformer.py's losses): its own saved input, which
        # layernorm drops as the final norm's output
        hnorm = 0.0 if self.rc.has("layernorm") else self.norm(H, 4)
        if hnorm and not self.fused_head and self.seq == 1 and self.c == 4 and not self.fp8:
            hnorm -= 4 * H  # that input is the plain head's saved input itself (counted in head_per_token)
        # eh_proj reads the concatenation of the two norms' outputs: a new tensor, kept in every mode
        return (self.norm(H, 4) + hnorm + self.linear_inputs(2 * H, 1, 4) + self.norm(H, self.c)) / self.seq

    def head_per_token(self) -> float:
        """Final norm plus the CE path's per-token bytes, main head and every MTP depth. Under TP the plain path
        saves the head's full-sequence input (gathered under SP), the log-softmax of this rank's vocabulary
        columns and the labels."""
        H, V, D = self.mc.hidden_size, self.mc.vocab_size, self.mc.num_nextn_predict_layers
        if self.fused_head:
            grad_h = 4 * H + D * self.c * H  # main: fp32 normed h; MTP: its stream's dtype
        else:
            # its input: an FP8 head's quantised copy, else as any Linear (a bf16 head under fp8: its cast)
            head_input = self.linear_inputs(H, 1, 4) if self.fp8_head or not self.fp8 else H * self.c
            grad_h = (1 + D) * (head_input + 4 * V / self.tp + 8)
        return self.norm(H, 4) / self.seq + grad_h

    def head_per_micro_batch(self) -> float:
        """Token-independent: the fused CE's fp32 weight gradient, main head and every MTP depth."""
        mc = self.mc
        return float((1 + mc.num_nextn_predict_layers) * mc.vocab_size * mc.hidden_size * 4) if self.fused_head else 0.0

    def embedding(self) -> float:
        """The token ids of each lookup (main and every MTP depth); under SP also the vocab-parallel lookup's
        fp32 mask of this rank's rows (parallel/sequence_parallel.py), full sequence, before the reduce-scatter."""
        return (8.0 + (4.0 if self.seq > 1 else 0.0)) * (1 + self.mc.num_nextn_predict_layers)

    # ------------------------------------------------------------ a whole model
    def by_kind(self, tokens: int) -> dict[str, float]:
        """Bytes one micro-batch of `tokens` saves, per kind, for the whole model (the probe's kinds)."""
        mc = self.mc
        out = {k: 0.0 for k in KINDS}
        for i in range(mc.num_hidden_layers):
            moe = mc.is_moe_layer(i)
            if self.rc.full_block(i):  # the block's input counts as its attention part's
                attention_tp, ffn_tp = self.full_tp_kept(moe, 4)
                out["attention"] += tokens * (mc.hidden_size * 4 / self.seq + attention_tp)
                out["moe" if moe else "dense_mlp"] += tokens * ((self.full_moe_kept(4) if moe else 0.0) / self.seq
                                                                + ffn_tp)
                continue
            out["attention"] += tokens * self.attention(4)
            out["moe" if moe else "dense_mlp"] += tokens * (self.moe(4) if moe else self.dense_mlp(4))
        for k in range(mc.num_nextn_predict_layers):
            pos = mc.num_hidden_layers + k
            out["mtp"] += tokens * (self.block(mc.is_moe_layer(pos), pos, mtp=True) + self.mtp_extra())
        out["head"] = tokens * self.head_per_token() + self.head_per_micro_batch()
        out["embedding"] = tokens * self.embedding()
        return out
