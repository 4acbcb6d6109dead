"""The form every family's mapping takes: a list of `HFTensor` entries, one per HF tensor, each
naming the tensor of our model it comes from (the reader and the writer walk the same list)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class HFTensor:
    """One tensor of an HF layout and where it lives in our model.

    `src` is our state-dict name. For a routed expert, `expert` indexes dim 0 of the
    [E, ...] stack and `rows` (start, stop) selects the gate or up half of gate_up_proj.
    `shared` marks the MTP copies of the embedding and output head: exported, but on
    import the main model's tensor wins (they are one tensor in moeforge).
    """

    hf_name: str
    src: str
    shape: tuple[int, ...]
    expert: Optional[int] = None
    rows: Optional[tuple[int, int]] = None
    shared: bool = False
    keep_fp32: bool = False  # the router bias stays fp32 whatever the export dtype

    def take(self, full: torch.Tensor, first_expert: int = 0) -> torch.Tensor:
        """This entry's slice of `full` (the whole src tensor, or experts [first_expert, ...) of it)."""
        if self.expert is None:
            return full
        t = full[self.expert - first_expert]
        return t if self.rows is None else t[self.rows[0] : self.rows[1]]
