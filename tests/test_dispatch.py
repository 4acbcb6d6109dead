"""All-to-all token dispatch (parallel.expert_parallel.AllToAllDispatcher, deduplicated) on 2 and 4 gloo ranks.

Every rank builds the same *global* problem from one seed (uneven token counts per
rank, top-2 routing over 8 experts, random gates, a capacity keep mask) and takes its
own slice, so each rank can also compute the single-process answer. The routing is
built to hit the edge cases: experts that receive no token at all, rank 0 sending
nothing to the last rank, and (on 4 ranks) a whole rank whose experts receive nothing.

Checks, per world size (one spawn of all ranks runs them all):
* identity experts: combine(dispatch(x)) == x * sum of the token's gates;
* experts that multiply by (global expert id + 1), built from the dispatcher's local
  expert counts: proves every row reached the right expert; the received rows are
  also compared one by one with the expected expert-major, source-rank-major order;
* real GroupedExperts (sliced from one full set): outputs and the gradients of x,
  the gates and the expert weights equal LocalDispatcher on all ranks' tokens;
* deduplication: each rank sends exactly one row per (token, rank holding any of the
  token's kept experts), and the routing has tokens with two experts on one rank;
* the same gradients with the overlapped (async) all-to-alls;
* capacity mode: dropped assignments are not sent (send/receive sizes and counts
  exclude them) and their gates contribute nothing, forward and backward.
"""

from __future__ import annotations

import datetime
import traceback

import pytest
import torch
import torch.distributed as dist

from models.experts import GroupedExperts
from models.moe import LocalDispatcher
from parallel.expert_parallel import AllToAllDispatcher
from tests.distributed import run_ranks

pytestmark = pytest.mark.multirank

N_EXPERTS, TOP_K, HIDDEN, INTER = 8, 2, 8, 4  # grouped_mm wants 16-byte row strides


def tokens_on(rank: int) -> int:
    return 7 + 3 * rank  # uneven on purpose


def allowed_experts(rank: int, world: int) -> list[int]:
    """Experts rank `rank` may route to; leaves some experts and peers without tokens."""
    n_local = N_EXPERTS // world
    banned = {1}  # rank 0's second expert never gets a token
    if world == 4:
        banned |= {6, 7}  # every expert of rank 3: that rank receives zero rows
    else:
        banned |= {N_EXPERTS - 1}
    if rank == 0:  # rank 0 sends nothing to the last rank
        banned |= set(range((world - 1) * n_local, world * n_local))
    return [e for e in range(N_EXPERTS) if e not in banned]


def global_problem(world: int) -> dict:
    g = torch.Generator().manual_seed(1234 + world)
    xs, idxs = [], []
    for r in range(world):
        t = tokens_on(r)
        allowed = torch.tensor(allowed_experts(r, world))
        xs.append(torch.randn(t, HIDDEN, generator=g))
        idxs.append(torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:TOP_K]] for _ in range(t)]))
    x, idx = torch.cat(xs), torch.cat(idxs)
    weight = torch.rand(x.shape[0], TOP_K, generator=g) + 0.1
    keep = torch.rand(x.shape[0], TOP_K, generator=g) > 0.35
    # Capacity mode: rank 1 drops everything it would send to rank 0 as well.
    lo, hi = tokens_on(0), tokens_on(0) + tokens_on(1)
    keep[lo:hi] &= idx[lo:hi] >= N_EXPERTS // world
    grad_out = torch.randn(x.shape[0], HIDDEN, generator=g)
    return {"x": x, "idx": idx, "weight": weight, "keep": keep, "grad_out": grad_out}


def my_slice(rank: int) -> slice:
    start = sum(tokens_on(r) for r in range(rank))
    return slice(start, start + tokens_on(rank))


def expected_rows(p: dict, rank: int, world: int, keep: bool) -> list[torch.Tensor]:
    """Rows each local expert of `rank` must receive: source-rank-major, then assignment order."""
    n_local = N_EXPERTS // world
    out = []
    for e in range(rank * n_local, (rank + 1) * n_local):
        chunks = []
        for s in range(world):
            sl = my_slice(s)
            flat = p["idx"][sl].flatten()
            sel = flat == e
            if keep:
                sel &= p["keep"][sl].flatten()
            token = sel.nonzero().flatten() // TOP_K
            chunks.append(p["x"][sl][token])
        out.append(torch.cat(chunks))
    return out


def multiplier(counts: torch.Tensor, rank: int) -> torch.Tensor:
    """Per received row: global expert id + 1, from the dispatcher's local expert counts."""
    n_local = counts.numel()
    return torch.repeat_interleave(torch.arange(n_local) + rank * n_local + 1.0, counts).unsqueeze(1)


def full_experts() -> GroupedExperts:
    torch.manual_seed(7)
    experts = GroupedExperts(N_EXPERTS, HIDDEN, INTER)
    experts.reset_parameters(0.5)
    return experts


def local_experts(full: GroupedExperts, rank: int, world: int) -> GroupedExperts:
    n_local = N_EXPERTS // world
    lo, hi = rank * n_local, (rank + 1) * n_local
    local = GroupedExperts(n_local, HIDDEN, INTER)
    with torch.no_grad():
        local.gate_up_proj.copy_(full.gate_up_proj[lo:hi])
        local.down_proj.copy_(full.down_proj[lo:hi])
    return local


def distinct_pairs(idx: torch.Tensor, keep, world: int) -> set[tuple[int, int]]:
    """(token, rank) pairs of the kept assignments: what a deduplicated dispatch sends."""
    n_local = N_EXPERTS // world
    return {(t, int(idx[t, k]) // n_local) for t in range(idx.shape[0]) for k in range(idx.shape[1])
            if keep is None or keep[t, k]}


# ------------------------------------------------------------------ checks (run on every rank)
def check_identity(p, rank, world, disp, use_keep):
    sl = my_slice(rank)
    x, idx, w = p["x"][sl], p["idx"][sl], p["weight"][sl]
    keep = p["keep"][sl] if use_keep else None
    rows, counts, ctx = disp.dispatch(x, idx, keep)
    out = disp.combine(rows * disp.row_gates(w, ctx).unsqueeze(1), ctx)  # all collectives before any assertion
    # Received rows are exactly the expected ones, grouped by local expert.
    want = expected_rows(p, rank, world, use_keep)
    assert counts.tolist() == [len(r) for r in want], (counts.tolist(), [len(r) for r in want])
    assert rows.shape[0] == int(counts.sum())
    for e, (got, exp) in enumerate(zip(rows.split(counts.tolist()), want)):
        torch.testing.assert_close(got, exp, rtol=0, atol=0, msg=lambda m: f"local expert {e}: {m}")
    # Deduplicated: one row per (token, rank holding any of its kept experts), counted per rank.
    pairs = distinct_pairs(idx, keep, world)
    assert ctx.send_splits == [sum(1 for _, r in pairs if r == d) for d in range(world)], (ctx.send_splits, pairs)
    assert sum(ctx.recv_splits) <= rows.shape[0]
    gates = w if keep is None else w * keep
    torch.testing.assert_close(out, x * gates.sum(1, keepdim=True), rtol=1e-6, atol=1e-6)
    return ctx


def check_edge_cases_hit(p, rank, world, ctx_dropless, ctx_capacity):
    """The routing really produced the cases this file promises to cover."""
    counts = torch.bincount(p["idx"].flatten(), minlength=N_EXPERTS)
    assert (counts == 0).any(), "no expert without tokens"
    if rank == 0:
        assert ctx_dropless.send_splits[world - 1] == 0, ctx_dropless.send_splits
    if world == 4 and rank == 3:
        assert sum(ctx_dropless.recv_splits) == 0, ctx_dropless.recv_splits
    if rank == 1:
        assert ctx_capacity.send_splits[0] == 0 and ctx_dropless.send_splits[0] > 0
    assert (~p["keep"]).any()
    sl = my_slice(rank)  # some token has two experts on one rank: deduplication saved rows
    assert len(distinct_pairs(p["idx"][sl], None, world)) < p["idx"][sl].numel()


def check_expert_ids(p, rank, world, disp, use_keep):
    sl = my_slice(rank)
    x, idx, w = p["x"][sl], p["idx"][sl], p["weight"][sl]
    keep = p["keep"][sl] if use_keep else None
    rows, counts, ctx = disp.dispatch(x, idx, keep)
    out = disp.combine(rows * multiplier(counts, rank) * disp.row_gates(w, ctx).unsqueeze(1), ctx)
    gates = w if keep is None else w * keep
    want = x * (gates * (idx + 1)).sum(1, keepdim=True)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


def check_grads(p, rank, world, disp, use_keep):
    sl = my_slice(rank)
    keep_all = p["keep"] if use_keep else None
    full = full_experts()
    # Reference: one process, all ranks' tokens, all experts.
    x_ref = p["x"].clone().requires_grad_(True)
    w_ref = p["weight"].clone().requires_grad_(True)
    local_disp = LocalDispatcher(N_EXPERTS)
    rows, counts, ctx = local_disp.dispatch(x_ref, p["idx"], keep_all)
    out_ref = local_disp.combine(full(rows, counts, local_disp.row_gates(w_ref, ctx)), ctx)
    (out_ref * p["grad_out"]).sum().backward()
    # Distributed: this rank's tokens, this rank's experts.
    experts = local_experts(full, rank, world)
    x = p["x"][sl].clone().requires_grad_(True)
    w = p["weight"][sl].clone().requires_grad_(True)
    keep = p["keep"][sl] if use_keep else None
    rows, counts, ctx = disp.dispatch(x, p["idx"][sl], keep)
    out = disp.combine(experts(rows, counts, disp.row_gates(w, ctx)), ctx)
    (out * p["grad_out"][sl]).sum().backward()

    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, out_ref[sl].detach(), **tol, msg=lambda m: f"output: {m}")
    torch.testing.assert_close(x.grad, x_ref.grad[sl], **tol, msg=lambda m: f"grad x: {m}")
    torch.testing.assert_close(w.grad, w_ref.grad[sl], **tol, msg=lambda m: f"grad gates: {m}")
    n_local = N_EXPERTS // world
    lo, hi = rank * n_local, (rank + 1) * n_local
    for name in ("gate_up_proj", "down_proj"):
        got, exp = getattr(experts, name).grad, getattr(full, name).grad[lo:hi]
        torch.testing.assert_close(got, exp, **tol, msg=lambda m: f"grad {name}: {m}")
    if use_keep:  # dropped assignments: no gradient reaches their gates
        assert (w.grad[~keep] == 0).all()
        assert (w.grad[keep] != 0).all()


def run_all_checks(rank: int, world: int) -> dict[str, str]:
    """Run every check on this rank; returns {check: '' if passed else the traceback}."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        disp = AllToAllDispatcher(N_EXPERTS, world, dist.group.WORLD)
        p = global_problem(world)
        results: dict[str, str] = {}
        contexts = {}

        def attempt(name, fn, *args):
            # Each check runs all its collectives before asserting anything, so every rank
            # issues the same collectives in the same order and a failure cannot hang a peer.
            try:
                contexts[name] = fn(p, rank, world, *args)
                results[name] = ""
            except Exception:
                results[name] = traceback.format_exc()

        attempt("identity_dropless", check_identity, disp, False)
        attempt("identity_capacity", check_identity, disp, True)
        attempt("expert_ids_dropless", check_expert_ids, disp, False)
        attempt("expert_ids_capacity", check_expert_ids, disp, True)
        attempt("grads_dropless", check_grads, disp, False)
        attempt("grads_capacity", check_grads, disp, True)
        overlapped = AllToAllDispatcher(N_EXPERTS, world, dist.group.WORLD, overlap=True)  # async all-to-alls
        attempt("grads_overlap_dropless", check_grads, overlapped, False)
        attempt("grads_overlap_capacity", check_grads, overlapped, True)
        if contexts.get("identity_dropless") and contexts.get("identity_capacity"):
            attempt("edge_cases_hit", check_edge_cases_hit, contexts["identity_dropless"], contexts["identity_capacity"])
        else:
            results["edge_cases_hit"] = "identity checks failed"
        dist.barrier()
        return results
    finally:
        dist.destroy_process_group()


CHECKS = ["identity_dropless", "identity_capacity", "expert_ids_dropless", "expert_ids_capacity",
          "grads_dropless", "grads_capacity", "grads_overlap_dropless", "grads_overlap_capacity", "edge_cases_hit"]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def rank_results(request):
    world = request.param
    return world, run_ranks(world, run_all_checks, world, timeout=120)


@pytest.mark.parametrize("check", CHECKS)
def test_all_to_all_dispatch(rank_results, check):
    world, results = rank_results
    failures = [f"rank {r}:\n{res[check]}" for r, res in enumerate(results) if res[check]]
    assert not failures, f"{check} on {world} ranks failed:\n" + "\n".join(failures)


def test_global_problem_covers_edge_cases():
    """Single-process sanity of the constructed routing (cheap, no ranks)."""
    for world in (2, 4):
        p = global_problem(world)
        counts = torch.bincount(p["idx"].flatten(), minlength=N_EXPERTS)
        assert counts[1] == 0 and counts[N_EXPERTS - 1] == 0
        assert (p["idx"][:, 0] != p["idx"][:, 1]).all()  # top-k picks distinct experts
