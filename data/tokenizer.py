"""Tokenizer: load a local HF `tokenizers` file, or train and cache a byte-level BPE.

`load_tokenizer(cfg)`:

* ``cfg.tokenizer`` set: ``tokenizers.Tokenizer.from_file`` on that tokenizer.json
  (or ``<dir>/tokenizer.json``).
* unset: a byte-level BPE (GPT-2 style pre-tokenizer and decoder, special tokens
  ``<|endoftext|>`` = EOS and ``<|pad|>``) trained on the text of the first
  source, capped at `TRAIN_TEXT_CAP_CHARS` for speed, and cached under
  ``cache_dir/tokenizers/<key>/``, where the key hashes the training file list
  (paths, sizes, mtimes), the vocabulary size and `TOKENIZER_VERSION`. The
  directory is built in a temporary sibling and renamed into place, under a
  file lock, so concurrent ranks train once and never see a half-written cache.
  It also holds ``tokenizer_config.json`` / ``special_tokens_map.json`` so that
  ``transformers.AutoTokenizer.from_pretrained(dir)`` loads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

from .config import DataConfig
from .errors import DataError, DataFileNotFoundError
from .sources import FMT_MEGATRON, BadRecordCounter, expand_source, file_format, is_remote, iter_documents

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Bump when the training recipe changes, so old caches are not reused.
TOKENIZER_VERSION = "bytelevel-bpe-v1"
# Training text cap (characters). The whole stdlib (~12 M chars, 731 files) trains a
# 4096-token BPE in ~2.5 s on 2 cores; larger corpora are sampled (files in a fixed shuffled order).
TRAIN_TEXT_CAP_CHARS = 16 * 1024 * 1024
# Fixed shuffle of the training files, so the capped sample spans the whole corpus.
_TRAIN_FILE_SEED = "moeforge-tokenizer"

_EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "[SEP]")
_PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "[PAD]", "<|finetune_right_pad_id|>")


class TextTokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the ids the data path needs.

    `path` is the directory holding tokenizer.json (and, for trained ones, the
    transformers config files); `save(dir)` writes a directory that
    ``transformers.AutoTokenizer.from_pretrained`` loads.
    """

    def __init__(self, tokenizer, path: str | os.PathLike, eos_token: str, pad_token: Optional[str] = None):
        self._tok = tokenizer
        # Special-token strings inside a document ("<|endoftext|>" quoted in some text) are
        # encoded as plain text: only the packer inserts real EOS ids, so document
        # boundaries (doc_ids) stay exact.
        self._tok.encode_special_tokens = True
        self.path = Path(path)
        self.eos_token = eos_token
        self.eos_id = self._id(eos_token)
        self.pad_token = pad_token if pad_token is not None else eos_token
        self.pad_id = self._id(self.pad_token)

    def _id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer at {self.path}: no token {token!r}")
        return i

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "TextTokenizer":
        """Load a tokenizer directory (or tokenizer.json) written by `save` or by training."""
        return _load_local(str(path))

    @property
    def tokenizer(self):
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> List[int]:
        # No special tokens (e.g. a BOS from a post-processor): the packer appends EOS itself.
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write tokenizer.json + transformers config files into `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(out / "tokenizer.json"))
        _write_hf_configs(out, self.eos_token, self.pad_token)
        return out

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id}, path='{self.path}')"


def load_tokenizer(cfg: DataConfig) -> TextTokenizer:
    """The tokenizer `cfg` asks for: a local file, or the cached (trained on first use) BPE."""
    if cfg.tokenizer is not None:
        return _load_local(cfg.tokenizer)
    return _load_or_train(cfg)


# ---------------------------------------------------------------------------------------
# Local tokenizer.json


def _load_local(path: str) -> TextTokenizer:
    from tokenizers import Tokenizer

    p = Path(os.path.expanduser(path))
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        where = f"{p} has no tokenizer.json" if p.is_dir() else f"{path!r} does not exist"
        raise DataFileNotFoundError(f"data.tokenizer: {where} (expected a HF tokenizers tokenizer.json or its directory)")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a plain Exception on bad JSON
        raise DataError(f"data.tokenizer: cannot load {file}: {e}") from None
    eos, pad = _special_tokens(tok, file.parent)
    return TextTokenizer(tok, file.parent, eos, pad)


def _special_tokens(tok, directory: Path) -> tuple[str, Optional[str]]:
    """EOS / pad tokens: from tokenizer_config.json when present, else well-known names."""
    eos = pad = None
    cfg_file = directory / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            conf = json.loads(cfg_file.read_text())
        except (OSError, json.JSONDecodeError):
            conf = {}

        def _name(v):
            return v.get("content") if isinstance(v, dict) else v

        eos, pad = _name(conf.get("eos_token")), _name(conf.get("pad_token"))
    if eos is None or tok.token_to_id(eos) is None:
        eos = next((t for t in _EOS_CANDIDATES if tok.token_to_id(t) is not None), None)
    if eos is None:
        raise DataError(
            f"data.tokenizer: {directory}: cannot find an end-of-text token "
            f"(tried tokenizer_config.json eos_token and {', '.join(_EOS_CANDIDATES)})"
        )
    if pad is None or tok.token_to_id(pad) is None:
        pad = next((t for t in _PAD_CANDIDATES if tok.token_to_id(t) is not None), None)
    return eos, pad


# ---------------------------------------------------------------------------------------
# Trained byte-level BPE, cached


def _training_files(cfg: DataConfig) -> List[str]:
    return expand_source(cfg.sources[0], 0, cfg.max_files, cfg.on_bad_record, BadRecordCounter(log=False))


def tokenizer_cache_key(cfg: DataConfig, files: Optional[List[str]] = None) -> str:
    files = _training_files(cfg) if files is None else files
    h = hashlib.sha256()
    meta = {
        "version": TOKENIZER_VERSION,
        "vocab_size": cfg.tokenizer_vocab_size,
        "cap": TRAIN_TEXT_CAP_CHARS,
        "text_field": cfg.sources[0].text_field,
        "on_bad_record": cfg.on_bad_record,
    }
    h.update(json.dumps(meta, sort_keys=True).encode())
    for f in files:
        if is_remote(f):
            h.update(f"\n{f}".encode())
            continue
        st = os.stat(f)
        h.update(f"\n{os.path.abspath(f)}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _load_or_train(cfg: DataConfig) -> TextTokenizer:
    from tokenizers import Tokenizer

    files = _training_files(cfg)
    root = cfg.resolved_cache_dir() / "tokenizers"
    final = root / tokenizer_cache_key(cfg, files)
    if not (final / "tokenizer.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        with _file_lock(root / f"{final.name}.lock"):
            if not (final / "tokenizer.json").is_file():  # another process may have built it meanwhile
                _train_into(cfg, files, final)
    tok = Tokenizer.from_file(str(final / "tokenizer.json"))
    return TextTokenizer(tok, final, EOS_TOKEN, PAD_TOKEN)


def _training_texts(cfg: DataConfig, files: List[str], stats: dict) -> Iterator[str]:
    order = list(files)
    random.Random(_TRAIN_FILE_SEED).shuffle(order)
    counter = BadRecordCounter()
    used = 0
    docs = 0
    src = cfg.sources[0]
    if order and all(file_format(f) == FMT_MEGATRON for f in order):
        raise DataError(
            f"data.tokenizer: data.sources[0] ({src.path!r}) is pre-tokenized (.bin/.idx), so no tokenizer can be "
            "trained on it; set data.tokenizer to the tokenizer it was made with"
        )
    order = [f for f in order if file_format(f) != FMT_MEGATRON]
    for text in iter_documents(order, src.text_field, cfg.on_bad_record, counter):
        text = text[: TRAIN_TEXT_CAP_CHARS - used]
        used += len(text)
        docs += 1
        yield text
        if used >= TRAIN_TEXT_CAP_CHARS:
            break
    stats.update(chars=used, files=len(order), docs=docs, bad_records=counter.as_dict())


def _train_into(cfg: DataConfig, files: List[str], final: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t0 = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.tokenizer_vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    stats: dict = {}
    tok.train_from_iterator(_training_texts(cfg, files, stats), trainer=trainer)
    seconds = time.perf_counter() - t0
    logger.info(
        "trained byte-level BPE (vocab %d) on %d chars (%d documents) of %s in %.1fs -> %s",
        tok.get_vocab_size(), stats.get("chars", 0), stats.get("docs", 0), cfg.sources[0].path, seconds, final,
    )

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        tok.save(str(tmp / "tokenizer.json"))
        _write_hf_configs(tmp, EOS_TOKEN, PAD_TOKEN)
        meta = {
            "version": TOKENIZER_VERSION,
            "vocab_size": tok.get_vocab_size(),
            "requested_vocab_size": cfg.tokenizer_vocab_size,
            "source": cfg.sources[0].path,
            "n_source_files": len(files),
            "train_documents": stats.get("docs", 0),
            "train_chars": stats.get("chars", 0),
            "bad_records": stats.get("bad_records", {}),
            "train_seconds": round(seconds, 3),
        }
        (tmp / "moeforge_tokenizer.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.replace(tmp, final)  # atomic; fails if `final` exists and is non-empty
        except OSError:
            if not (final / "tokenizer.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_hf_configs(directory: Path, eos: str, pad: Optional[str]) -> None:
    """tokenizer_config.json / special_tokens_map.json for transformers' AutoTokenizer."""
    special = {"eos_token": eos, "bos_token": eos, "unk_token": eos}
    if pad is not None:
        special["pad_token"] = pad
    conf = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(conf, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock (POSIX flock); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
