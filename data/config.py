"""Data configuration: the `data` section of the experiment config.

Plain dataclasses with type hints and defaults, so that `train/config.py` can
embed `DataConfig` in its structured OmegaConf schema (unknown keys and wrong
types are then rejected by OmegaConf with the key's path); `validate()` adds
the value checks and raises ``ValueError("data.<key>: ...")``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

# Special source path: the Python standard library's own .py files (the
# embedded default corpus, present on every machine that runs moeforge).
PYTHON_STDLIB = "@python-stdlib"

BAD_RECORD_POLICIES = ("error", "skip")
RESUME_POLICIES = ("exact", "restart")  # data.resume (data/resume.py)

# Byte-level BPE starts from 256 byte tokens plus the two special tokens.
MIN_TRAINED_VOCAB = 256 + 2


@dataclass
class SourceConfig:
    """One corpus. `path`: a file, a glob, a directory (searched recursively), a
    remote URL (``https://``, ``hf://``, ``s3://`` ... through fsspec, where a
    network exists), a Megatron ``.bin/.idx`` prefix, or ``@python-stdlib``.
    The format comes from the extension: .jsonl / .jsonl.gz (one JSON object per
    line), .parquet, .txt / .py (one document per file), .bin + .idx (Megatron
    pre-tokenized). `weight`: this source's share of the training tokens in a
    blend (relative; normalised over all sources). `text_field`: the field
    holding the document text in .jsonl and .parquet files. `holdout`: the share of
    the source's files (chosen by a hash of each path, data/holdout.py) that training
    never reads; the same source in `eval.sources` reads only those."""

    path: str
    weight: float = 1.0
    text_field: str = "text"
    holdout: float = 0.0


@dataclass
class DataConfig:
    sources: List[SourceConfig] = field(default_factory=lambda: [SourceConfig(path=PYTHON_STDLIB)])
    # Local path to a HF `tokenizers` tokenizer.json, or a directory holding one.
    # None: a byte-level BPE trained on first use on the first source, cached.
    tokenizer: Optional[str] = None
    tokenizer_vocab_size: int = 4096  # for the trained BPE only
    # Where the trained tokenizer is cached. None: $MOEFORGE_CACHE, else ~/.cache/moeforge.
    cache_dir: Optional[str] = None
    on_bad_record: str = "error"  # error | skip
    seed: int = 1234  # file-order shuffles and the sequence shuffle buffer
    max_files: Optional[int] = None  # per source: keep this many files (evenly spread), for quick runs
    # Seeded shuffle over packed sequences (before the data-parallel split): this many
    # sequences are held and one is drawn at random per step. 0: off (file order only).
    # Its contents are part of the data state (~1.5 bytes per token held after compression).
    shuffle_buffer: int = 0
    # DataLoader worker processes that parse and tokenize text; 0 = in the training process.
    # Changing it never changes the stream (and a resumed run may use another value).
    num_workers: int = 0
    # Resuming from a checkpoint whose data stream differs from this config's (data/resume.py):
    # exact = refuse; restart = start the new mixture's stream from its beginning (a new phase),
    # keeping model, optimizer and step.
    resume: str = "exact"

    def validate(self) -> None:
        """Value checks; raise ValueError naming the offending key."""
        if self.on_bad_record not in BAD_RECORD_POLICIES:
            raise ValueError(f"data.on_bad_record: must be error|skip, got {self.on_bad_record!r}")
        if self.resume not in RESUME_POLICIES:
            raise ValueError(f"data.resume: must be exact|restart, got {self.resume!r}")
        if not isinstance(self.sources, (list, tuple)) or len(self.sources) == 0:
            raise ValueError("data.sources: needs at least one source ({path, weight, text_field})")
        for i, src in enumerate(self.sources):
            key = f"data.sources[{i}]"
            if not isinstance(src, SourceConfig):
                raise ValueError(f"{key}: expected a SourceConfig {{path, weight, text_field}}, got {type(src).__name__}")
            if not isinstance(src.path, str) or not src.path.strip():
                raise ValueError(f"{key}.path: must be a non-empty file, glob or directory path (or {PYTHON_STDLIB})")
            w = src.weight
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
                raise ValueError(f"{key}.weight: must be a finite number > 0, got {w!r}")
            h = src.holdout
            if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0 <= h < 1:
                raise ValueError(f"{key}.holdout: must be a share of the files in [0, 1), got {h!r}")
            if not isinstance(src.text_field, str) or not src.text_field:
                raise ValueError(f"{key}.text_field: must be a non-empty field name, got {src.text_field!r}")
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer.strip()):
            raise ValueError("data.tokenizer: must be a local path to tokenizer.json (or its directory), or null")
        if self.tokenizer is None and self.tokenizer_vocab_size < MIN_TRAINED_VOCAB:
            raise ValueError(
                f"data.tokenizer_vocab_size: must be >= {MIN_TRAINED_VOCAB} (256 bytes + 2 special tokens), "
                f"got {self.tokenizer_vocab_size}"
            )
        if self.max_files is not None and self.max_files < 1:
            raise ValueError(f"data.max_files: must be >= 1 or null, got {self.max_files}")
        for key in ("shuffle_buffer", "num_workers"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"data.{key}: must be an integer >= 0, got {v!r}")
        if self.cache_dir is not None and not str(self.cache_dir).strip():
            raise ValueError("data.cache_dir: must be a directory path or null")

    def resolved_cache_dir(self) -> Path:
        """`cache_dir`, else $MOEFORGE_CACHE, else ~/.cache/moeforge."""
        d = self.cache_dir or os.environ.get("MOEFORGE_CACHE") or os.path.join("~", ".cache", "moeforge")
        return Path(os.path.expanduser(d))
