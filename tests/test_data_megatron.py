"""Megatron .bin/.idx: writer vs megatron-core's builder, index checks, preprocess CLI round trip,
pre-tokenized sources in the stream (equality with on-the-fly tokenization, resume, bad input)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data import DataConfig, SourceConfig, TextBatchStream, load_tokenizer
from data import preprocess
from data.megatron import IndexedWriter, IndexMismatch, MegatronDocuments, check_pair, indexed_dataset_class

mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")

REPO = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
SEQ = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("mcorpus")
    rng = random.Random(1)
    for i in range(3):
        lines = [json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(1, 50)))}) for _ in range(25)]
        (root / f"part{i}.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    cfg = DataConfig(sources=[SourceConfig(str(corpus))], tokenizer_vocab_size=300,
                     cache_dir=str(tmp_path_factory.mktemp("mcache")))
    return load_tokenizer(cfg)


def _docs_of(path: Path):
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def _preprocess(tok, out: Path, *inputs, extra=()):
    args = [*map(str, inputs), "--output-prefix", str(out), "--tokenizer", str(tok.path), "--no-progress", *extra]
    assert preprocess.main(args) == 0
    return json.loads(Path(f"{out}.manifest.json").read_text())


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def _assert_same(xs, ys):
    for a, b in zip(xs, ys, strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_writer_bytes_equal_megatron_builder(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, size=n) for n in (5, 1, 0, 17, 300)]
    for dtype in (np.uint16, np.int32):
        ours = IndexedWriter(str(tmp_path / f"ours_{dtype.__name__}"), dtype)
        theirs = mcore.IndexedDatasetBuilder(str(tmp_path / f"theirs_{dtype.__name__}.bin"), dtype=dtype)
        for d in docs:
            ours.add_document(d)
            theirs.add_item(torch.from_numpy(d.astype(np.int64)))
            theirs.end_document()
        ours.finalize()
        theirs.finalize(str(tmp_path / f"theirs_{dtype.__name__}.idx"))
        for ext in (".bin", ".idx"):
            a = (tmp_path / f"ours_{dtype.__name__}{ext}").read_bytes()
            b = (tmp_path / f"theirs_{dtype.__name__}{ext}").read_bytes()
            assert a == b, ext
        ds = mcore.IndexedDataset(str(tmp_path / f"ours_{dtype.__name__}"))
        assert [x.tolist() for x in ds] == [d.tolist() for d in docs]
    with pytest.raises(ValueError, match="outside uint16"):
        IndexedWriter(str(tmp_path / "x"), np.uint16).add_document([70000])


def test_multi_sequence_documents(tmp_path):
    b = mcore.IndexedDatasetBuilder(str(tmp_path / "s.bin"), dtype=np.int32)
    for seqs in ([[1, 2], [3]], [[4]], [[5, 6, 7], [8], [9]]):
        for s in seqs:
            b.add_item(torch.tensor(s))
        b.end_document()
    b.finalize(str(tmp_path / "s.idx"))
    docs = MegatronDocuments(str(tmp_path / "s"))
    assert len(docs) == 3
    assert [d.tolist() for d in docs.documents(0, 3)] == [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    assert [d.tolist() for d in docs.documents(1, 9)] == [[4], [5, 6, 7, 8, 9]]


def _pair(tmp_path, name, docs, dtype=np.uint16):
    w = IndexedWriter(str(tmp_path / name), dtype)
    for d in docs:
        w.add_document(d)
    w.finalize()
    return str(tmp_path / name)


def test_check_pair_finds_mismatches(tmp_path):
    good = _pair(tmp_path, "good", [[1, 2, 3], [4, 5]])
    assert check_pair(good).documents == 2 and check_pair(good).tokens == 5
    other = _pair(tmp_path, "other", [[1, 2], [3, 4, 5, 6]])

    def broken(name, bin_bytes=None, idx_bytes=None):
        p = tmp_path / name
        (tmp_path / f"{name}.bin").write_bytes(bin_bytes if bin_bytes is not None else Path(good + ".bin").read_bytes())
        (tmp_path / f"{name}.idx").write_bytes(idx_bytes if idx_bytes is not None else Path(good + ".idx").read_bytes())
        return str(p)

    gb, gi = Path(good + ".bin").read_bytes(), Path(good + ".idx").read_bytes()
    cases = {
        "truncated_bin": (broken("tb", bin_bytes=gb[:-2]), r"holds 8: the \.idx does not match its \.bin"),
        "longer_bin": (broken("lb", bin_bytes=gb + b"\0\0"), "does not match its .bin"),
        "idx_of_other": (broken("oi", idx_bytes=Path(other + ".idx").read_bytes()), r"describes 12 bytes .* holds 10"),
        "bad_pointer": (broken("bp", idx_bytes=gi[:34 + 8 + 8] + (7).to_bytes(8, "little") + gi[34 + 8 + 16:]),
                        "sequence 1 points to byte 7, expected 6"),
        "not_an_index": (broken("na", idx_bytes=b"x" * 64), "not a Megatron index"),
        "truncated_idx": (broken("ti", idx_bytes=gi[:-8]), "needs"),
        "short_idx": (broken("si", idx_bytes=gi[:20]), "too short"),
    }
    for name, (prefix, match) in cases.items():
        with pytest.raises(IndexMismatch, match=match):
            check_pair(prefix)
    # megatron-core alone would read the truncated .bin without complaint
    ds = indexed_dataset_class()(cases["truncated_bin"][0])
    assert len(ds) == 2
    os.remove(good + ".idx")
    with pytest.raises(FileNotFoundError, match=r"good\.idx does not exist"):
        check_pair(good)


def test_preprocess_round_trip(corpus, tok, tmp_path):
    (corpus_bad := tmp_path / "bad.jsonl").write_text('{"text": "alpha"}\n{oops\n{"text": "beta gamma"}\n')
    m = _preprocess(tok, tmp_path / "out" / "c", corpus, corpus_bad, extra=["--on-bad-record", "skip", "--workers", "2"])
    files = sorted(corpus.glob("*.jsonl")) + [corpus_bad]
    texts = [t for f in files for t in (_docs_of(f) if f != corpus_bad else ["alpha", "beta gamma"])]
    assert m["documents"] == len(texts) and m["bad_records"] == {"malformed_json": 1} and m["dtype"] == "uint16"
    ds = mcore.IndexedDataset(str(tmp_path / "out" / "c"))  # read back through megatron-core
    assert len(ds) == len(texts)
    for got, text in zip(ds, texts):
        assert got.tolist() == tok.encode(text) + [tok.eos_id]
    assert m["tokens"] == sum(len(tok.encode(t)) + 1 for t in texts)
    # the same with sharding, no workers: shards concatenate to the same documents
    m2 = _preprocess(tok, tmp_path / "sh" / "c", corpus, extra=["--max-shard-tokens", "200"])
    assert len(m2["shards"]) > 2 and all(Path(s["prefix"] + ".idx").is_file() for s in m2["shards"])
    again = [x.tolist() for s in m2["shards"] for x in mcore.IndexedDataset(s["prefix"])]
    assert again == [x.tolist() for x in ds][: len(again)] and len(again) == len(texts) - 2
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed json"):
        _preprocess(tok, tmp_path / "strict" / "c", corpus_bad)
    assert not list((tmp_path / "strict").glob("*.bin*"))  # nothing half-written left behind


def test_preprocess_cli_subprocess(corpus, tok, tmp_path):
    out = tmp_path / "cli" / "c"
    r = subprocess.run(
        [sys.executable, "-m", "data.preprocess", str(corpus / "part0.jsonl"), "--output-prefix", str(out),
         "--tokenizer", str(tok.path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "wrote 25 documents" in r.stdout and "tokens/s" in r.stdout
    assert "preprocess" in r.stderr  # the progress bar
    assert len(MegatronDocuments(str(out))) == 25


@pytest.mark.parametrize("shuffle", [0, 4])
def test_bin_source_streams_like_jsonl(corpus, tok, tmp_path, shuffle):
    src = corpus / "part1.jsonl"
    _preprocess(tok, tmp_path / "p1", src)
    _preprocess(tok, tmp_path / "p1_noeos", src, extra=["--no-append-eos"])
    ref = _take(TextBatchStream(DataConfig(sources=[SourceConfig(str(src))], shuffle_buffer=shuffle), tok, SEQ, 3), 25)
    for prefix in ("p1", "p1.bin", "p1_noeos.idx"):  # EOS appended by the reader where missing
        cfg = DataConfig(sources=[SourceConfig(str(tmp_path / prefix))], shuffle_buffer=shuffle)
        _assert_same(ref, _take(TextBatchStream(cfg, tok, SEQ, 3), 25))


def test_resume_with_megatron_source(corpus, tok, tmp_path):
    _preprocess(tok, tmp_path / "m" / "c", corpus, extra=["--max-shard-tokens", "300"])
    cfg = DataConfig(
        sources=[SourceConfig(str(tmp_path / "m"), weight=2.0), SourceConfig(str(corpus / "part2.jsonl"))],
        shuffle_buffer=3, seed=11,
    )
    full = _take(TextBatchStream(cfg, tok, SEQ, 2, dp_rank=0, dp_world=2), 30)
    for stop in (3, 17):
        s = TextBatchStream(cfg, tok, SEQ, 2, dp_rank=0, dp_world=2)
        _take(s, stop)
        r = TextBatchStream(cfg, tok, SEQ, 2, dp_rank=0, dp_world=2)
        r.load_state_dict(json.loads(json.dumps(s.state_dict())))
        _assert_same(full[stop:], _take(r, 30 - stop))
    share = np.array(r.source_tokens, float)
    assert abs(share[0] / share.sum() - 2 / 3) < 0.02


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_idx_not_matching_bin(tok, tmp_path, policy):
    d = tmp_path / "d"
    d.mkdir()
    _pair(d, "a", [[5, 6, 7]] * 20)
    _pair(d, "b", [[8, 9]] * 20)
    _pair(tmp_path, "other", [[1]] * 7)
    os.replace(tmp_path / "other.idx", d / "b.idx")  # b.idx now describes another .bin
    s = TextBatchStream(DataConfig(sources=[SourceConfig(str(d))], on_bad_record=policy), tok, SEQ, 2)
    if policy == "error":
        with pytest.raises(ValueError, match=r"b\.bin: index mismatch: .*b\.idx describes 14 bytes .* but .*b\.bin holds 80"):
            _take(s, 10)
    else:
        batches = _take(s, 10)
        assert s.bad_records["index_mismatch"] >= 1
        flat = torch.cat([b["input_ids"] for b in batches]).unique().tolist()
        assert set(flat) <= {5, 6, 7, tok.eos_id}  # only the good pair is read


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_token_ids_outside_the_vocabulary(tok, tmp_path, policy):
    _pair(tmp_path, "v", [[5, 6], [7, 999], [8, 9]] * 10)
    s = TextBatchStream(DataConfig(sources=[SourceConfig(str(tmp_path / "v"))], on_bad_record=policy), tok, SEQ, 1)
    if policy == "error":
        with pytest.raises(ValueError, match=r"v\.bin: document 1: token out of range: token id 999 outside"):
            next(s)
    else:
        _take(s, 3)
        assert s.bad_records["token_out_of_range"] >= 5  # every third document
