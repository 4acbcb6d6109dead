"""Data pipeline throughput: tokens/s of TextBatchStream next to what the tiny trainer consumes.

Corpus: the Python standard library's .py files (the demo corpus), one document
each, written as jsonl shards; the same documents pre-tokenized into Megatron
.bin/.idx by `python -m data.preprocess`. Tokenizer: the demo's cached BPE
(configs/tiny.yaml). For each of

    jsonl, tokenized on the fly      with 0 and 2 DataLoader workers
    .bin/.idx, pre-tokenized         with 0 and 2 workers (read in the main process either way)

it builds a TextBatchStream (seq_len / micro-batch of the tiny config), lets it
warm up, then times batches until --tokens tokens were produced. Then it times
a few optimizer steps of the tiny trainer (configs/tiny.yaml) for comparison.
Numbers depend on how many cores are free: run it on an idle machine. The
last column is tokens per CPU-second of the training process alone (workers
excluded): the ceiling the pipeline reaches when enough cores run workers.

    python bench/data_pipeline.py [--tokens 4e6] [--workers 0 2] [--trainer-steps 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data import DataConfig, SourceConfig, TextBatchStream, load_tokenizer  # noqa: E402
from data import preprocess  # noqa: E402
from data.sources import stdlib_files  # noqa: E402


def write_jsonl_corpus(out: Path, shards: int) -> int:
    out.mkdir(parents=True, exist_ok=True)
    files = stdlib_files()
    handles = [open(out / f"stdlib_{i:02d}.jsonl", "w") for i in range(shards)]
    n = 0
    for k, f in enumerate(files):
        text = Path(f).read_text(encoding="utf-8", errors="replace")
        if text.strip():
            handles[k % shards].write(json.dumps({"text": text}) + "\n")
            n += 1
    for h in handles:
        h.close()
    return n


def time_stream(cfg: DataConfig, tok, seq_len: int, mbs: int, workers: int, tokens: float) -> dict:
    t0 = time.perf_counter()
    s = TextBatchStream(cfg, tok, seq_len, mbs, num_workers=workers)
    next(s)
    first = time.perf_counter() - t0
    for _ in range(2):
        next(s)
    n, t1, c1 = 0, time.perf_counter(), time.process_time()
    while n < tokens:
        b = next(s)
        n += b["input_ids"].numel()
    secs = time.perf_counter() - t1
    cpu = time.process_time() - c1  # this process only: the workers' CPU is not in it
    s.close()
    return {"tokens_per_s": n / secs, "first_batch_s": first, "tokens": n, "seconds": secs,
            "main_cpu_tokens_per_s": n / max(cpu, 1e-9)}


def time_trainer(steps: int, run_dir: Path, overrides: list[str]) -> dict:
    from train.config import load_config
    from train.trainer import Trainer

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"run.dir={run_dir}", "checkpoint.interval=0", *overrides])
    trainer = Trainer(cfg)
    trainer.train_step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    secs = time.perf_counter() - t0
    per_step = cfg.train.micro_batch_size * cfg.train.seq_len * cfg.train.grad_accum_steps
    return {"tokens_per_s": steps * per_step / secs, "step_s": secs / steps}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=float, default=4e6,
                   help="tokens to time per configuration (well above the workers' read-ahead)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--shards", type=int, default=8, help="jsonl files the corpus is split into")
    p.add_argument("--trainer-steps", type=int, default=5, help="0: skip the trainer")
    p.add_argument("--seq-len", type=int, default=None, help="default: configs/tiny.yaml")
    p.add_argument("--micro-batch", type=int, default=None, help="default: configs/tiny.yaml")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    from omegaconf import OmegaConf

    tiny = OmegaConf.load(REPO / "configs" / "tiny.yaml")
    seq_len = args.seq_len or int(tiny.train.seq_len)
    mbs = args.micro_batch or int(tiny.train.micro_batch_size)
    data_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), tiny.data))
    t0 = time.perf_counter()
    tok = load_tokenizer(data_cfg)
    print(f"tokenizer: {tok} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)

    results: dict = {"seq_len": seq_len, "micro_batch_size": mbs, "cpus": os.cpu_count(), "pipeline": {}}
    with tempfile.TemporaryDirectory(prefix="moeforge-bench-data-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        docs = write_jsonl_corpus(tmp / "jsonl", args.shards)
        print(f"corpus: {docs} stdlib documents in {args.shards} jsonl files ({time.perf_counter() - t0:.1f}s)",
              file=sys.stderr)
        t0 = time.perf_counter()
        preprocess.main([str(tmp / "jsonl"), "--output-prefix", str(tmp / "bin" / "stdlib"),
                         "--tokenizer", str(tok.path), "--workers", str(max(args.workers)), "--no-progress"])
        results["preprocess_s"] = time.perf_counter() - t0
        sources = {
            "jsonl (on-the-fly)": SourceConfig(str(tmp / "jsonl")),
            ".bin/.idx (pre-tokenized)": SourceConfig(str(tmp / "bin" / "stdlib")),
        }
        for name, src in sources.items():
            for w in args.workers:
                cfg = DataConfig(sources=[src], tokenizer=str(tok.path))
                r = time_stream(cfg, tok, seq_len, mbs, w, args.tokens)
                results["pipeline"][f"{name}, {w} workers"] = r
                print(f"  {name:28s} workers={w}: {r['tokens_per_s']:>12,.0f} tokens/s "
                      f"(first batch after {r['first_batch_s']:.2f}s)", file=sys.stderr)
        if args.trainer_steps:
            over = []
            if args.seq_len:
                over.append(f"train.seq_len={args.seq_len}")
            if args.micro_batch:
                over.append(f"train.micro_batch_size={args.micro_batch}")
            try:
                results["trainer"] = time_trainer(args.trainer_steps, tmp / "run", over)
            except Exception as e:  # the bench still reports the pipeline
                results["trainer"] = {"error": f"{type(e).__name__}: {e}"}

    if args.json:
        print(json.dumps(results))
        return 0
    print(f"\ndata pipeline, seq_len {seq_len}, micro-batch {mbs}, {results['cpus']} CPUs "
          f"(preprocess of the corpus: {results['preprocess_s']:.1f}s)")
    print(f"{'configuration':45s} {'tokens/s':>14s} {'per main-process CPU s':>24s}")
    for name, r in results["pipeline"].items():
        print(f"{name:45s} {r['tokens_per_s']:>14,.0f} {r['main_cpu_tokens_per_s']:>24,.0f}")
    tr = results.get("trainer")
    if tr:
        if "error" in tr:
            print(f"{'tiny trainer (configs/tiny.yaml)':45s} {'n/a':>14s}  ({tr['error']})")
        else:
            print(f"{'tiny trainer consumes (configs/tiny.yaml)':45s} {tr['tokens_per_s']:>14,.0f}"
                  f"  ({tr['step_s']:.2f} s/step)")
            slowest = min(r["tokens_per_s"] for r in results["pipeline"].values())
            print(f"slowest pipeline configuration / trainer: {slowest / tr['tokens_per_s']:,.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
