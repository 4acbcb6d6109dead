"""Per-step MoE state with one owner: aux-loss scale and sum, expert load, the bias update.

A training step over the MoE layers of one process runs
  begin_step(n)      every aux loss gets gradient 1/n, n = micro-batches of the global batch
  forward passes     each MoE layer records its routing and aux loss here (`record`)
  aux_sum()          sum of the recorded aux losses (this process's layers and micro-batches)
  end_step(gamma, reduce) -> ExpertLoad
                     token counts [L, E] summed over the step's micro-batches and, by `reduce`
                     (the data-parallel all-reduce), over ranks; one aux-loss-free bias update per
                     layer from those global counts, b_i += gamma * sign(mean load - load_i) (V3 §2.1.2)
No torch.distributed here: the caller passes the reduction in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from models.balance import bias_update


@dataclass
class ExpertLoad:
    """One step's expert-load statistics of some MoE layers, rows in `layer_ids` order."""

    layer_ids: list[int]  # model position of each row: decoder layer index, then L + k for MTP depth k + 1
    counts: torch.Tensor  # [L, E] tokens routed to each expert (global when reduced over ranks)
    biases: Optional[torch.Tensor]  # [L, E] aux-loss-free router biases after the update; None for V2 routers
    dropped_tokens: float  # assignments dropped by the capacity factor (V2), summed over the layers


def merge_expert_loads(loads: list[ExpertLoad]) -> Optional[ExpertLoad]:
    """The statistics of disjoint layer sets (e.g. pipeline stages) as one, rows in model order."""
    if not loads:
        return None
    ids = [i for load in loads for i in load.layer_ids]
    order = sorted(range(len(ids)), key=ids.__getitem__)
    counts = torch.cat([load.counts for load in loads])[order]
    has_biases = all(load.biases is not None for load in loads)
    biases = torch.cat([load.biases for load in loads])[order] if has_biases else None
    return ExpertLoad([ids[j] for j in order], counts, biases, sum(load.dropped_tokens for load in loads))


class MoEStepState:
    """The step state of a list of MoE layers (models.moe.moe_layers), which record into it."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = list(layers)
        for layer in self.layers:
            layer.step_state = self
        self.aux_loss_scale = 1.0  # d(objective)/d(aux loss of one layer and micro-batch)
        self._clear()

    def _clear(self) -> None:
        n_experts = self.layers[0].cfg.n_routed_experts if self.layers else 0
        device = self.layers[0].gate.weight.device if self.layers else torch.device("cpu")
        self._counts = torch.zeros(len(self.layers), n_experts, device=device)
        self._dropped = torch.zeros(len(self.layers), device=device)
        self._aux = torch.zeros((), dtype=torch.float64, device=device)

    def begin_step(self, n_micro_global: int) -> None:
        """Start a step of `n_micro_global` micro-batches over all ranks: the aux losses are
        averaged over the global batch, so each gets gradient 1 / n_micro_global."""
        self.aux_loss_scale = 1.0 / n_micro_global
        self._clear()

    @torch.no_grad()
    def record(self, layer: nn.Module, topk_idx: torch.Tensor, keep: Optional[torch.Tensor],
               aux_loss: torch.Tensor) -> None:
        """One training forward of `layer`: its kept expert assignments [T, K] and its aux loss."""
        i = self.layers.index(layer)  # by identity (modules compare so); survives a deepcopy of the model
        kept = topk_idx.flatten() if keep is None else topk_idx.flatten()[keep.flatten()]
        self._counts[i] += torch.bincount(kept, minlength=self._counts.shape[1]).to(self._counts.dtype)
        if keep is not None:
            self._dropped[i] += (~keep).sum()
        self._aux += aux_loss.detach()

    def aux_sum(self) -> torch.Tensor:
        """Sum (fp64, 0-d) of the aux losses recorded since begin_step."""
        return self._aux

    def end_step(self, gamma: float,
                 reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Optional[ExpertLoad]:
        """Apply the step's bias update and return its load statistics; None without MoE layers.

        The counts of all layers (and their dropped tokens, as one more column) go through
        `reduce` as one [L, E + 1] tensor, so distributed code sums them with one all-reduce."""
        if not self.layers:
            return None
        table = torch.cat([self._counts, self._dropped.unsqueeze(1)], dim=1)
        if reduce is not None:
            table = reduce(table)
        counts, dropped = table[:, :-1], table[:, -1]
        with torch.no_grad():
            for layer, load in zip(self.layers, counts):
                if gamma > 0 and layer.gate.uses_bias:
                    bias_update(layer.gate.e_score_correction_bias, load, gamma)
        biases = None
        if all(layer.gate.uses_bias for layer in self.layers):
            biases = torch.stack([layer.gate.e_score_correction_bias.detach().clone() for layer in self.layers])
        self._clear()
        return ExpertLoad([layer.layer_idx for layer in self.layers], counts, biases, float(dropped.sum()))
