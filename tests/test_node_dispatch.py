"""Node-limited routing mapped to ranks: the layout rules, and the hierarchical dispatch
(parallel/node_dispatch.py) on 4 gloo ranks simulating 2 nodes x 2 ranks (and 4 nodes x 1).

Config and planner refusals run in-process. One 4-rank launch runs every dispatcher check:
* the node groups parallel/mesh.py builds (inter-node: same local index; intra-node: one node),
  also with tp and pp dimensions around ep;
* the hierarchical dispatch on test_dispatch.py's global problem (8 experts, uneven tokens, experts
  and ranks without tokens): every row reaches the right expert, and outputs and the gradients of
  x, the gates and the expert weights equal LocalDispatcher on all ranks' tokens; dropless and
  capacity mode (dropped assignments never sent), synchronous and overlapped; FP8 rows (E4M3 +
  1x128 scales, train.precision=fp8) reach the experts bitwise as quantised, their gradient exactly;
* with the real group-limited router (tiny's 16 experts, top-4, 4 groups), counted from the pairs
  the dispatcher sends: a token reaches at most topk_group nodes, and each (token, node) crosses
  once (one row per distinct (token, node) of its kept experts), on 2 x 2 and on 4 x 1; the same
  tokens routed without the group limit do reach more nodes, so the count can fail.
The training parity of the 2 x 2 layout is tests/test_parallel_parity.py's `ep4_2nodes`, its
ledger against the planner tests/test_comm_ledger.py's.
"""

from __future__ import annotations

import datetime
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from parallel import layout
from tests.distributed import run_ranks
from tests.test_dispatch import N_EXPERTS, check_expert_ids, check_grads, global_problem, my_slice
from train.config import ConfigError, ParallelConfig, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
EP4 = ["parallel.dp_shard=4", "parallel.ep=4"]


# ------------------------------------------------------------------ layout rules (no ranks)
@pytest.mark.parametrize("extra, words", [
    (["parallel.ep_ranks_per_node=3"], ["parallel.ep_ranks_per_node", "ep=4 is not a multiple", "divides ep"]),
    (["parallel.ep_ranks_per_node=1", "model.n_group=2", "model.topk_group=1"],
     ["parallel.ep_ranks_per_node", "spans 4 nodes", "model.n_group=2", "straddle", "multiple of 4"]),
    (["parallel.ep_ranks_per_node=0"], ["parallel.ep_ranks_per_node", "auto or an integer >= 1"]),
    (["parallel.ep_ranks_per_node=1", "model.n_routed_experts=1024", "model.n_group=4", "parallel.dp_shard=2",
      "parallel.ep=2"], ["parallel.ep_ranks_per_node", "512 experts per node", "int8"]),
])
def test_layouts_whose_groups_cannot_map_to_nodes_are_refused(extra, words):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, EP4 + extra)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_routing_without_groups_needs_no_mapping():
    """n_group 1, or greedy top-k (which ignores the groups): any node count is accepted."""
    for extra in (["model.n_group=1", "model.topk_group=1"], ["model.n_group=2", "model.topk_group=1",
                                                              "model.topk_method=greedy"]):
        p = load_config(TINY, EP4 + ["parallel.ep_ranks_per_node=1"] + extra).parallel
        assert layout.ep_nodes(p) == 4


def test_planner_runs_the_same_check():
    from train.plan import check_layout

    cfg = load_config(TINY, EP4 + ["parallel.ep_ranks_per_node=2"])
    assert check_layout(cfg, 4)[0] == []
    cfg.parallel.ep_ranks_per_node = 1  # 4 nodes; n_group=4 still maps, n_group=2 does not
    assert check_layout(cfg, 4)[0] == []
    cfg.model.n_group, cfg.model.topk_group = 2, 1
    errors = check_layout(cfg, 4)[0]
    assert len(errors) == 1 and errors[0].startswith("parallel.ep_ranks_per_node: the EP group spans 4 nodes"), errors


def test_ranks_per_node_auto(monkeypatch):
    """auto: LOCAL_WORLD_SIZE / tp, at most ep; one node outside torchrun; groups inside a node change nothing."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    p = load_config(TINY, EP4).parallel
    assert p.ep_ranks_per_node == 4 and layout.ep_nodes(p) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    p = load_config(TINY, EP4).parallel
    assert p.ep_ranks_per_node == 2 and layout.ep_nodes(p) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    p = load_config(TINY, ["parallel.tp=2", "parallel.dp_shard=4", "parallel.ep=4"]).parallel
    assert p.ep_ranks_per_node == 4 and layout.ep_nodes(p) == 1
    assert layout.resolve_ep_ranks_per_node(ParallelConfig(ep=8, tp=2), 8) == 4
    assert layout.ep_nodes(ParallelConfig(ep=2, ep_ranks_per_node=8)) == 1


# ------------------------------------------------------------------ the dispatcher (4 ranks)
def check_groups(rank: int, ctx, ctx_tp, ctx_pp) -> None:
    """2 x 2: EP rank = rank; tp 2 x ep 2 on 2 nodes x 1: EP ranks tp apart; pp 2 x ep 2 on 2 x 1: per stage."""
    node, local = divmod(rank, 2)
    assert ctx.ep_nodes == 2
    assert dist.get_process_group_ranks(ctx.ep_inter_group) == [local, 2 + local]
    assert dist.get_process_group_ranks(ctx.ep_intra_group) == [2 * node, 2 * node + 1]
    assert dist.get_process_group_ranks(ctx_tp.ep_inter_group) == [rank % 2, 2 + rank % 2]
    assert dist.get_process_group_ranks(ctx_tp.ep_intra_group) == [rank]
    assert dist.get_process_group_ranks(ctx_pp.ep_inter_group) == [2 * node, 2 * node + 1]


def routed_tokens(rank: int, topk_group: int):
    """tiny's router (16 experts, top-4, 4 groups; random weights and biases, same on every rank) on
    this rank's 96 random tokens."""
    from models.router import Router

    cfg = load_config(TINY, [f"model.topk_group={topk_group}"]).model
    torch.manual_seed(5)
    router = Router(cfg)
    router.reset_parameters(0.5)
    with torch.no_grad():
        router.e_score_correction_bias.normal_(0, 0.2)
    x = torch.randn(96, cfg.hidden_size, generator=torch.Generator().manual_seed(100 + rank))
    with torch.no_grad():
        out = router(x)
    return cfg, x, out.topk_idx


def sent_node_pairs(disp, x, topk_idx) -> tuple[list[tuple[int, int]], int]:
    """(token, node) of every row the inter-node stage sent, read from its send state; rows received."""
    rows, counts, (inter, intra) = disp.finish(disp.start(x, topk_idx, None))
    node_of_row = torch.repeat_interleave(torch.arange(len(inter.send_splits)), torch.tensor(inter.send_splits))
    return list(zip(inter.pair_token.tolist(), node_of_row.tolist())), int(counts.sum())


def check_crossings(rank: int, nodes: int, ranks_per_node: int, inter_group, intra_group) -> dict:
    """Nodes per token and crossings per (token, node), counted from what the dispatcher sends."""
    from parallel.node_dispatch import NodeLimitedDispatcher

    found = {}
    for topk_group in (1, 2, 4):  # 4 = n_group: no group limit (the control)
        cfg, x, topk_idx = routed_tokens(rank, topk_group)
        disp = NodeLimitedDispatcher(cfg.n_routed_experts, nodes, ranks_per_node, inter_group, intra_group)
        pairs, received = sent_node_pairs(disp, x, topk_idx)
        experts_per_node = cfg.n_routed_experts // nodes
        wanted = {(t, int(e) // experts_per_node) for t in range(x.shape[0]) for e in topk_idx[t]}
        assert len(pairs) == len(set(pairs)) == len(wanted) and set(pairs) == wanted, "a (token, node) crossed twice"
        per_token = torch.bincount(torch.tensor([t for t, _ in pairs]), minlength=x.shape[0])
        found[topk_group] = (int(per_token.max()), int(per_token.min()), received)
    return found


def check_fp8_rows(p, rank, disp):
    """FP8 rows (models/fp8.py's QuantisedRows, as under train.precision=fp8) through both stages: each
    expert rank gets the unquantised dispatch's rows as their E4M3 bytes + 1x128 scales, and the rows'
    gradient (through the stand-in) comes back to x exactly like the unquantised rows'."""
    from models.fp8 import quantise_rows, quantize_tiles

    sl = my_slice(rank)
    idx = p["idx"][sl]
    x = p["x"][sl].clone().requires_grad_(True)
    x8 = p["x"][sl].clone().requires_grad_(True)
    plain, counts, _ = disp.dispatch(x, idx, None)
    rows8, counts8, _ = disp.dispatch(quantise_rows(x8), idx, None)
    probe = torch.randn(plain.shape, generator=torch.Generator().manual_seed(rank))
    (plain * probe).sum().backward()
    (rows8.grad * probe).sum().backward()  # every collective before any assertion
    q, scales = quantize_tiles(plain.detach())
    assert torch.equal(counts8, counts)
    assert torch.equal(rows8.data.view(torch.uint8), q.view(torch.uint8)) and torch.equal(rows8.scales, scales)
    assert torch.equal(x8.grad, x.grad)


def run_node_checks(rank: int) -> dict[str, object]:
    from parallel.mesh import build_context
    from parallel.node_dispatch import NodeLimitedDispatcher

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    results: dict[str, object] = {}

    def attempt(name, fn, *args):  # every check issues its collectives before asserting anything
        try:
            results[name] = fn(*args)
        except Exception:
            results[name] = traceback.format_exc()
            results[f"{name}_failed"] = True

    try:
        cpu = torch.device("cpu")
        ctx = build_context(ParallelConfig(dp_shard=4, ep=4, ep_ranks_per_node=2), cpu)
        ctx_tp = build_context(ParallelConfig(tp=2, dp_shard=2, ep=2, ep_ranks_per_node=1), cpu)
        ctx_pp = build_context(ParallelConfig(pp=2, dp_shard=2, ep=2, ep_ranks_per_node=1), cpu)
        attempt("groups", check_groups, rank, ctx, ctx_tp, ctx_pp)
        p = global_problem(4)
        for overlap in (False, True):
            disp = NodeLimitedDispatcher(N_EXPERTS, 2, 2, ctx.ep_inter_group, ctx.ep_intra_group, overlap)
            for keep in (False, True):
                tag = f"{'overlap' if overlap else 'sync'}_{'capacity' if keep else 'dropless'}"
                attempt(f"expert_ids_{tag}", check_expert_ids, p, rank, 4, disp, keep)
                attempt(f"grads_{tag}", check_grads, p, rank, 4, disp, keep)
        attempt("fp8_rows", check_fp8_rows, p, rank,
                NodeLimitedDispatcher(N_EXPERTS, 2, 2, ctx.ep_inter_group, ctx.ep_intra_group))
        attempt("crossings_2x2", check_crossings, rank, 2, 2, ctx.ep_inter_group, ctx.ep_intra_group)
        ctx4 = build_context(ParallelConfig(dp_shard=4, ep=4, ep_ranks_per_node=1), cpu)
        attempt("crossings_4x1", check_crossings, rank, 4, 1, ctx4.ep_inter_group, ctx4.ep_intra_group)
        dist.barrier()
        return results
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def node_results():
    return run_ranks(4, run_node_checks, timeout=300)


CHECKS = ["groups", "fp8_rows"] + [f"{c}_{o}_{k}" for c in ("expert_ids", "grads") for o in ("sync", "overlap")
                       for k in ("dropless", "capacity")]


@pytest.mark.multirank
@pytest.mark.parametrize("check", CHECKS)
def test_hierarchical_dispatch(node_results, check):
    failures = [f"rank {r}:\n{res[check]}" for r, res in enumerate(node_results) if res.get(f"{check}_failed")]
    assert not failures, "\n".join(failures)


@pytest.mark.multirank
@pytest.mark.parametrize("layout_name, nodes", [("crossings_2x2", 2), ("crossings_4x1", 4)])
def test_tokens_reach_at_most_topk_group_nodes(node_results, layout_name, nodes):
    failures = [res[layout_name] for res in node_results if res.get(f"{layout_name}_failed")]
    assert not failures, "\n".join(map(str, failures))
    for topk_group in (1, 2, 4):
        most = max(res[layout_name][topk_group][0] for res in node_results)
        assert most <= min(topk_group, nodes), (layout_name, topk_group, most)
        assert min(res[layout_name][topk_group][1] for res in node_results) >= 1
        # every assignment reached its expert: the rows the experts received sum to tokens x K over ranks
        assert sum(res[layout_name][topk_group][2] for res in node_results) == 4 * 96 * 4
    # Without the group limit some token does reach more nodes than topk_group=1 (2) allows.
    assert max(res[layout_name][4][0] for res in node_results) > (1 if nodes == 2 else 2)
