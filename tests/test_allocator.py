"""retain_freed_memory: training steps stop paying page faults for re-allocated activations."""

import json
import subprocess
import sys

SCRIPT = r"""
import json, resource, sys, torch
sys.path.insert(0, {repo!r})
from models import ModelConfig, Transformer
from train.allocator import retain_freed_memory
torch.set_num_threads(1)
ok = retain_freed_memory() if {retain} else None
torch.manual_seed(0)
cfg = ModelConfig(vocab_size=4096, hidden_size=256, num_hidden_layers=2, first_k_dense_replace=1,
                  intermediate_size=512, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                  moe_intermediate_size=128, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
                  qk_rope_head_dim=16, v_head_dim=32, num_attention_heads=4, max_position_embeddings=256,
                  rope_scaling=None)
model = Transformer(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
ids = torch.randint(0, 4096, (4, 256))
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(ids, ids).loss(0.0).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({{"ok": ok, "faults": faults}}))
"""


def _run(retain: bool, repo) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(repo=str(repo), retain=retain)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_training_steps_reuse_memory_without_page_faults(repo_root):
    retained = _run(True, repo_root)
    default = _run(False, repo_root)
    assert retained["ok"] is True  # glibc on this machine
    # Steady state (after warm-up): a step's activations (~100 MiB here) come back from the heap:
    # essentially no new pages, where glibc's defaults fault thousands of pages in again per step.
    steady = retained["faults"][4:]
    assert max(steady) < 1024, retained  # < 4 MiB of fresh pages per step (of ~100 MiB allocated)
    assert sum(default["faults"][4:]) >= sum(steady), (default, retained)
