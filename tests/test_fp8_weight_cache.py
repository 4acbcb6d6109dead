"""FP8 weights are quantised once per weight version and shared by every micro-batch (models.fp8.QuantisedWeights).

Counted with the saved-tensor probe (train/memory_probe.py): over 4 accumulated micro-batches autograd saves
one quantised copy per FP8 weight, not four; the numbers are those of quantising on every call; a weight
changed in place (the optimizer step) is quantised again.
"""

from __future__ import annotations

import copy

import torch

from models.fp8 import (Fp8GroupedGemm, Fp8Linear, Fp8Recipe, fp8_linear, quantised_weight_stores,
                        release_quantised_weights)
from models.transformer import Transformer
from train.config import load_config
from train.memory_probe import SavedTensorProbe
from train.precision import apply_precision

MICRO_BATCHES = 4


def _fp8_model(repo_root):
    cfg = load_config(repo_root / "configs" / "tiny.yaml", ["model.num_hidden_layers=2", "train.precision=fp8"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    policy = apply_precision(model, "fp8", fp8_backend="emulate")
    return cfg, model, policy


def _fp8_weights(model) -> int:
    linears = sum(isinstance(m, Fp8Linear) for m in model.modules())
    grouped = sum(isinstance(getattr(m, "gemm", None), Fp8GroupedGemm) for m in model.modules())
    return linears + 2 * grouped  # gate_up and down per routed-expert module


def _accumulate(model, policy, batches, keep_graphs: bool):
    """Forward (and backward) of every micro-batch under the probe; all graphs alive at once if keep_graphs."""
    losses = []
    with SavedTensorProbe(model) as probe:
        for m, ids in enumerate(batches):
            if m:
                probe.next_micro_batch()
            with policy.autocast(torch.device("cpu")):
                loss = model(ids[:, :-1], ids[:, 1:]).loss(0.3)
            if keep_graphs:
                losses.append(loss)
            else:
                loss.backward()
        counted = probe.result()
    if keep_graphs:
        sum(losses).backward()
    return counted


def test_four_micro_batches_save_one_quantised_copy_per_weight(repo_root):
    cfg, model, policy = _fp8_model(repo_root)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.model.vocab_size, (2, 25), generator=gen) for _ in range(MICRO_BATCHES)]
    n_weights = _fp8_weights(model)
    assert n_weights > 10
    reference = copy.deepcopy(model)  # quantises on every call: its stores are bypassed below
    for store in quantised_weight_stores(reference):
        store.capacity = 0

    for keep_graphs in (True, False):  # a pipeline's micro-batches in flight / plain gradient accumulation
        model.zero_grad(set_to_none=True)
        counted = _accumulate(model, policy, batches, keep_graphs)
        assert counted.fp8_weight_storages == n_weights, (keep_graphs, counted.fp8_weight_storages, n_weights)
        release_quantised_weights(model)
        assert all(len(s) == 0 for s in quantised_weight_stores(model))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # Without sharing, every micro-batch saves its own copy: the count can fail.
    uncached = _accumulate(reference, policy, batches, keep_graphs=False)
    assert uncached.fp8_weight_storages == MICRO_BATCHES * n_weights
    # The same numbers: the shared copy is the copy each call would have made.
    for n, p in reference.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, grads[n]), n


def test_a_weight_changed_in_place_is_quantised_again():
    torch.manual_seed(0)
    lin = Fp8Linear(256, 128, bias=False, recipe=Fp8Recipe(backend="emulate"))
    x = torch.randn(8, 256)
    y0 = lin(x)
    q0 = lin.quantised_weights.tensors()[0]
    assert torch.equal(lin(x), y0) and lin.quantised_weights.tensors()[0] is q0  # reused
    with torch.no_grad():
        lin.weight.mul_(1.5)  # what the optimizer step does: an in-place write bumps the version
    y1 = lin(x)
    assert lin.quantised_weights.tensors()[0] is not q0
    assert torch.equal(y1, fp8_linear(x, lin.weight, recipe=lin.recipe))  # fresh quantisation's numbers
    assert not torch.equal(y1, y0)
    assert len(copy.deepcopy(lin).quantised_weights) == 0  # a copy starts empty
