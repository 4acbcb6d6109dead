"""Tokenizer: trained byte-level BPE (cached, deterministic), local files, transformers export."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import data.tokenizer as tokmod
from data.config import DataConfig, SourceConfig
from data.tokenizer import EOS_TOKEN, PAD_TOKEN, TextTokenizer, load_tokenizer, tokenizer_cache_key

WORDS = "def class return self import from while for if else lambda yield value index data (x) [i] = + - : , 0 1 42".split()


def _corpus(directory: Path, n_files: int = 4, seed: int = 0) -> Path:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(150)]
        (directory / f"f{i}.py").write_text("\n".join(lines) + "\n")
    docs = [{"text": f"document {i}: héllo wörld ✓ " + " ".join(rng.choices(WORDS, k=20))} for i in range(50)]
    (directory / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return directory


def _cfg(corpus: Path, cache: Path, **kw) -> DataConfig:
    return DataConfig(sources=[SourceConfig(str(corpus))], tokenizer_vocab_size=300, cache_dir=str(cache), **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return load_tokenizer(_cfg(corpus, cache)), cache


SAMPLES = [
    "def f(x):\n    return x + 1\n",
    "  leading and trailing spaces  \n\n\t tabs",
    "unicode: héllo wörld ✓ 日本語 🙂",
    "",
    "<|endoftext|> in plain text",
]


def test_trained_tokenizer_basics(trained):
    tok, cache = trained
    assert isinstance(tok, TextTokenizer)
    assert tok.vocab_size == 300
    assert (tok.eos_id, tok.pad_id) == (0, 1)
    assert tok.decode([tok.eos_id, tok.pad_id]) == EOS_TOKEN + PAD_TOKEN
    assert tok.path.parent == cache / "tokenizers"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "moeforge_tokenizer.json"):
        assert (tok.path / name).is_file(), name
    assert not [p for p in tok.path.parent.iterdir() if ".tmp-" in p.name]  # no leftovers


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(trained, text):
    tok, _ = trained
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]


def test_special_token_text_is_plain_text(trained):
    tok, _ = trained
    ids = tok.encode("a <|endoftext|> b <|pad|>")
    assert tok.eos_id not in ids and tok.pad_id not in ids
    assert tok.decode(ids) == "a <|endoftext|> b <|pad|>"


def test_bpe_merges_learned(trained):
    tok, _ = trained
    text = "def class return self import"
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_cache_reused(trained, corpus, monkeypatch):
    tok, cache = trained

    def no_training(*a, **k):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setattr(tokmod, "_train_into", no_training)
    again = load_tokenizer(_cfg(corpus, cache))
    assert again.path == tok.path
    assert (again.path / "tokenizer.json").read_bytes() == (tok.path / "tokenizer.json").read_bytes()
    assert again.encode(SAMPLES[0]) == tok.encode(SAMPLES[0])


def test_training_is_deterministic(trained, corpus, tmp_path):
    tok, _ = trained
    other = load_tokenizer(_cfg(corpus, tmp_path))
    assert other.path != tok.path and other.path.name == tok.path.name
    assert (other.path / "tokenizer.json").read_bytes() == (tok.path / "tokenizer.json").read_bytes()


def test_cache_key_tracks_inputs(tmp_path):
    corpus = _corpus(tmp_path / "c", n_files=2)
    cfg = _cfg(corpus, tmp_path / "cache")
    key = tokenizer_cache_key(cfg)
    assert tokenizer_cache_key(cfg) == key
    assert tokenizer_cache_key(_cfg(corpus, tmp_path / "cache", max_files=1)) != key
    cfg400 = DataConfig(sources=cfg.sources, tokenizer_vocab_size=400, cache_dir=cfg.cache_dir)
    assert tokenizer_cache_key(cfg400) != key
    (corpus / "f0.py").write_text("changed\n")
    assert tokenizer_cache_key(cfg) != key


def test_env_cache_dir(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEFORGE_CACHE", str(tmp_path / "env"))
    cfg = DataConfig(sources=[SourceConfig(str(corpus / "f0.py"))], tokenizer_vocab_size=280)
    tok = load_tokenizer(cfg)
    assert tok.path.parent == tmp_path / "env" / "tokenizers" and tok.vocab_size <= 280


def test_local_tokenizer_file_and_dir(trained):
    tok, _ = trained
    for path in (tok.path, tok.path / "tokenizer.json"):
        local = load_tokenizer(DataConfig(tokenizer=str(path)))
        assert (local.eos_id, local.pad_id, local.vocab_size) == (tok.eos_id, tok.pad_id, tok.vocab_size)
        assert local.encode(SAMPLES[2]) == tok.encode(SAMPLES[2])
        assert local.path == tok.path
    assert TextTokenizer.from_dir(tok.path).encode(SAMPLES[0]) == tok.encode(SAMPLES[0])


def test_local_tokenizer_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.tokenizer: .*nope.*does not exist"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match=r"data\.tokenizer: .* has no tokenizer\.json"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path)))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"data\.tokenizer: cannot load"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path)))


def test_save_and_transformers_autotokenizer(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok, _ = trained
    for directory in (tok.path, tok.save(tmp_path / "export")):
        hf = transformers.AutoTokenizer.from_pretrained(str(directory))
        assert hf.eos_token == EOS_TOKEN and hf.eos_token_id == tok.eos_id
        assert hf.pad_token == PAD_TOKEN and hf.pad_token_id == tok.pad_id
        for text in SAMPLES[:3]:
            assert hf(text)["input_ids"] == tok.encode(text)
            assert hf.decode(tok.encode(text)) == text
