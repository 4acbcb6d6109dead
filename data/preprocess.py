"""Tokenize a corpus into Megatron ``.bin/.idx`` shards.

    python -m data.preprocess corpus/*.jsonl.gz --output-prefix data/web --tokenizer tok/ --workers 4
    python -m data.preprocess corpus/ --output-prefix data/web --config configs/tiny.yaml --max-shard-tokens 1e9

Inputs are files, globs, directories or URLs, as a ``data.sources`` path
(jsonl / jsonl.gz / parquet / txt / py; existing .bin/.idx are re-sharded). They
are read in the order given, each expanded in sorted order, documents in file
order, with the same reader, checks and bad-record policy as training. Each
document is tokenized, followed by EOS (Megatron's ``--append-eod``; the
training reader appends EOS only where a document does not already end with
it), and written as one sequence. Output: ``PREFIX.bin/.idx``, or
``PREFIX_00000.bin/.idx``, ``PREFIX_00001...`` with ``--max-shard-tokens``,
plus ``PREFIX.manifest.json`` (tokenizer, counts, bad records). A
``data.sources`` entry with ``path: PREFIX`` (or the directory, or a glob over
the shards) trains on them.

The tokenizer is ``--tokenizer PATH`` (tokenizer.json or its directory) or the
one a training config selects (``--config FILE [key=value ...]``: its ``data``
section, so the cached BPE of the demo is found or trained exactly as
training would). Token dtype: uint16 below 65500 ids, else int32 (as Megatron).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import List, Optional

import numpy as np

from .config import DataConfig, SourceConfig
from .megatron import IndexedWriter, optimal_dtype
from .sources import R_DOC, BadRecordCounter, SourceReader, chunks, expand_source, handle_bad
from .tokenize_workers import TokenizedChunks

logger = logging.getLogger("data.preprocess")


class ShardedWriter:
    """IndexedWriters in sequence, a new shard once one holds `max_tokens`."""

    def __init__(self, prefix: str, dtype, max_tokens: Optional[int]):
        self.prefix, self.dtype, self.max_tokens = prefix, dtype, max_tokens
        self.done: List[dict] = []
        self._w: Optional[IndexedWriter] = None
        self.documents = self.tokens = 0

    def _name(self) -> str:
        return self.prefix if self.max_tokens is None else f"{self.prefix}_{len(self.done):05d}"

    def add(self, tokens: np.ndarray) -> None:
        if self._w is None:
            self._w = IndexedWriter(self._name(), self.dtype)
        self._w.add_document(tokens)
        self.documents += 1
        self.tokens += tokens.size
        if self.max_tokens is not None and self._w.tokens >= self.max_tokens:
            self._close()

    def _close(self) -> None:
        info = self._w.finalize()
        self.done.append({"prefix": self._w.prefix, "documents": info.documents, "tokens": info.tokens})
        self._w = None

    def finalize(self) -> List[dict]:
        if self._w is not None or not self.done:
            if self._w is None:  # nothing at all: still write an (empty) pair
                self._w = IndexedWriter(self._name(), self.dtype)
            self._close()
        return self.done

    def abort(self) -> None:
        if self._w is not None:
            self._w.abort()


def _tokenizer(args):
    if args.tokenizer:
        from .tokenizer import TextTokenizer

        return TextTokenizer.from_dir(args.tokenizer)
    from omegaconf import OmegaConf

    from .tokenizer import load_tokenizer

    conf = OmegaConf.load(args.config)
    data = OmegaConf.merge(OmegaConf.structured(DataConfig), conf.get("data", {}))
    over = [o[len("data."):] if o.startswith("data.") else o for o in args.overrides]
    data = OmegaConf.merge(data, OmegaConf.from_dotlist(over))
    cfg = OmegaConf.to_object(data)
    cfg.validate()
    return load_tokenizer(cfg)


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m data.preprocess", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="files, globs, directories or URLs (as data.sources paths); with --config also key=value")
    p.add_argument("--output-prefix", required=True, help="PREFIX for PREFIX[_NNNNN].bin/.idx")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--tokenizer", help="tokenizer.json or its directory")
    g.add_argument("--config", help="training config whose data section selects the tokenizer")
    p.add_argument("--text-field", default="text", help="JSON/parquet field with the text (default: text)")
    p.add_argument("--on-bad-record", choices=("error", "skip"), default="error")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (0: this process)")
    p.add_argument("--max-shard-tokens", type=float, default=None, help="start a new shard after this many tokens")
    p.add_argument("--no-append-eos", action="store_true", help="do not end each document with EOS")
    p.add_argument("--dtype", choices=("auto", "uint16", "int32"), default="auto")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_intermixed_args(argv)
    # key=value words are overrides of the --config data section (data.x=y or x=y), not inputs
    args.overrides = [i for i in args.inputs if "=" in i and not os.path.exists(i)]
    args.inputs = [i for i in args.inputs if i not in args.overrides]
    if args.overrides and not args.config:
        p.error("key=value overrides need --config")
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    if not args.inputs:
        p.error("no inputs")
    return args


def run(args) -> dict:
    t0 = time.perf_counter()
    tokenizer = _tokenizer(args)
    vocab, eos = int(tokenizer.vocab_size), int(tokenizer.eos_id)
    counter = BadRecordCounter()
    files: List[str] = []
    for i, path in enumerate(args.inputs):
        for f in expand_source(SourceConfig(path, text_field=args.text_field), i, None, args.on_bad_record, counter):
            if f not in files:
                files.append(f)
    if not files:
        raise SystemExit("data.preprocess: no input files left (see the warnings above)")
    dtype = optimal_dtype(vocab) if args.dtype == "auto" else np.dtype(args.dtype).type
    max_tokens = int(args.max_shard_tokens) if args.max_shard_tokens else None
    reader = SourceReader(0, files, args.text_field, shuffle=False)
    writer = ShardedWriter(args.output_prefix, dtype, max_tokens)
    eos_arr = np.array([eos], dtype=np.int64)

    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(files), unit="file", desc="preprocess", file=sys.stderr, dynamic_ncols=True)

    schedule = ((0, rows) for rows in chunks(reader.rows(epochs=1)))
    results = TokenizedChunks(schedule, tokenizer, [args.text_field], args.workers)
    last_file = 0
    try:
        for _, res in results:
            for epoch, file, rec, kind, value in res:
                if kind == R_DOC:
                    writer.add(value if args.no_append_eos else np.concatenate([value, eos_arr]))
                else:
                    reason, loc, detail = value
                    handle_bad(reason, f"{files[file]}{loc}", detail, args.on_bad_record, counter)
                if progress is not None and file > last_file:
                    progress.update(file - last_file)
                    last_file = file
            if progress is not None:
                secs = time.perf_counter() - t0
                progress.set_postfix(docs=writer.documents, tokens=writer.tokens, tok_s=f"{writer.tokens / secs:.3g}", refresh=False)
        shards = writer.finalize()
    except BaseException:
        writer.abort()
        raise
    finally:
        results.close()
        if progress is not None:
            progress.update(len(files) - last_file)
            progress.close()
    secs = time.perf_counter() - t0
    manifest = {
        "inputs": list(args.inputs),
        "files": len(files),
        "tokenizer": str(getattr(tokenizer, "path", "")),
        "vocab_size": vocab,
        "eos_id": eos,
        "append_eos": not args.no_append_eos,
        "dtype": np.dtype(dtype).name,
        "documents": writer.documents,
        "tokens": writer.tokens,
        "shards": shards,
        "bad_records": counter.as_dict(),
        "seconds": round(secs, 3),
    }
    with open(f"{args.output_prefix}.manifest.json", "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return manifest


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parse(argv)
    m = run(args)
    bad = f", bad records skipped: {m['bad_records']}" if m["bad_records"] else ""
    print(
        f"wrote {m['documents']} documents, {m['tokens']} tokens ({m['dtype']}) from {m['files']} files "
        f"into {len(m['shards'])} shard(s) at {args.output_prefix} in {m['seconds']:.1f}s "
        f"({m['tokens'] / max(m['seconds'], 1e-9):.3g} tokens/s){bad}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
