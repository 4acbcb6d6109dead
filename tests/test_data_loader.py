"""TextBatchStream: determinism, data-parallel sharding, exact resume, blends, bad records."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from data import DataConfig, SourceConfig, TextBatchStream, load_tokenizer
from data.config import PYTHON_STDLIB
from data.sources import read_documents

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
SEQ = 16


def _docs(rng, n, lo=1, hi=40):
    return [" ".join(rng.choices(WORDS, k=rng.randint(lo, hi))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    rng = random.Random(0)
    a = root / "a"
    a.mkdir()
    for i in range(5):
        (a / f"part{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _docs(rng, 12)))
    b = root / "b"
    b.mkdir()
    for i in range(4):
        (b / f"doc{i}.txt").write_text("\n".join(_docs(rng, 3, 20, 60)) + "\n")
    return root


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    cfg = DataConfig(sources=[SourceConfig(str(corpus / "a"))], tokenizer_vocab_size=300,
                     cache_dir=str(tmp_path_factory.mktemp("cache")))
    return load_tokenizer(cfg)


def _cfg(corpus, *sources, **kw):
    srcs = [SourceConfig(str(corpus / s)) if isinstance(s, str) else s for s in (sources or ("a",))]
    return DataConfig(sources=srcs, **kw)


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def _rows(batches, key="input_ids"):
    return torch.cat([b[key] for b in batches]) if batches else torch.empty(0, SEQ, dtype=torch.long)


def test_batch_shapes_and_stream_contents(corpus, tok):
    cfg = _cfg(corpus)
    s = TextBatchStream(cfg, tok, seq_len=SEQ, micro_batch_size=3)
    batches = _take(s, 60)  # more than one epoch of source "a"
    for b in batches:
        assert set(b) == {"input_ids", "labels", "doc_ids"}
        for v in b.values():
            assert v.shape == (3, SEQ) and v.dtype == torch.int64
    inputs, labels, docs = (_rows(batches, k) for k in ("input_ids", "labels", "doc_ids"))
    # adjacent sequences of one rank's (1-rank) stream continue each other
    np.testing.assert_array_equal(labels[:, :-1], inputs[:, 1:])
    np.testing.assert_array_equal(labels[:-1, -1], inputs[1:, 0])
    # the stream is epoch 0's documents, files in the seeded order, each + EOS: nothing lost
    src = s._sources[0]
    expected = []
    for f in src.file_order(0):
        for text in read_documents(f):
            expected += tok.encode(text) + [tok.eos_id]
    flat = inputs.reshape(-1).tolist()
    assert len(flat) > len(expected)
    assert flat[: len(expected)] == expected
    assert s.epochs[0] >= 1 and s.bad_records == {}
    assert src.file_order(0) != src.file_order(1)  # reshuffled per epoch
    # doc ids restart per sequence and step after every EOS
    for row_in, row_doc in zip(inputs, docs):
        assert row_doc[0] == 0
        steps = (row_in[:-1] == tok.eos_id).long()
        np.testing.assert_array_equal(row_doc[1:] - row_doc[:-1], steps)


def test_deterministic_across_constructions(corpus, tok):
    a = _rows(_take(TextBatchStream(_cfg(corpus), tok, SEQ, 2), 10))
    b = _rows(_take(TextBatchStream(_cfg(corpus), tok, SEQ, 2), 10))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = _rows(_take(TextBatchStream(_cfg(corpus, seed=7), tok, SEQ, 2), 10))
    assert not torch.equal(a, c)  # the seed changes the file order


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_partition_the_single_rank_stream(corpus, tok, world):
    m, steps = 2, 8
    single = TextBatchStream(_cfg(corpus), tok, SEQ, micro_batch_size=m * world)
    ranks = [TextBatchStream(_cfg(corpus), tok, SEQ, m, dp_rank=r, dp_world=world) for r in range(world)]
    for _ in range(steps):
        glob = next(single)
        parts = [next(r) for r in ranks]
        for key in ("input_ids", "labels", "doc_ids"):
            # rank r holds global sequences r, r+W, ...: the union is the global batch, no overlap
            together = torch.stack([p[key] for p in parts], dim=1).reshape(m * world, SEQ)
            torch.testing.assert_close(together, glob[key], rtol=0, atol=0)


def test_no_duplicates_between_ranks(corpus, tok):
    # within the first epoch every sequence is distinct; two ranks share none
    r0, r1 = (TextBatchStream(_cfg(corpus), tok, SEQ, 4, dp_rank=r, dp_world=2) for r in (0, 1))
    a = {tuple(x.tolist()) for x in _rows(_take(r0, 5))}
    b = {tuple(x.tolist()) for x in _rows(_take(r1, 5))}
    assert len(a) == len(b) == 20 and not a & b


def test_exact_resume(corpus, tok):
    cfg = _cfg(corpus, "a", SourceConfig(str(corpus / "b"), weight=0.5))
    full = _take(TextBatchStream(cfg, tok, SEQ, 2, dp_rank=1, dp_world=2), 12)
    s = TextBatchStream(cfg, tok, SEQ, 2, dp_rank=1, dp_world=2)
    _take(s, 5)
    state = s.state_dict()
    assert state["sequences_consumed"] == 10 and state["global_sequences"] == 20
    state = json.loads(json.dumps(state))  # checkpoint-friendly: plain JSON types
    resumed = TextBatchStream(cfg, tok, SEQ, 2, dp_rank=1, dp_world=2)
    resumed.load_state_dict(state)
    for a, b in zip(full[5:], _take(resumed, 7)):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert resumed.state_dict() == TextBatchStream(cfg, tok, SEQ, 2, dp_rank=1, dp_world=2).state_dict() | {
        "sequences_consumed": 24, "global_sequences": 48}


def test_resume_under_another_world_size(corpus, tok):
    two = [TextBatchStream(_cfg(corpus), tok, SEQ, 2, dp_rank=r, dp_world=2) for r in range(2)]
    for r in two:
        _take(r, 3)  # 12 global sequences consumed
    one = TextBatchStream(_cfg(corpus), tok, SEQ, 4)
    one.load_state_dict(two[0].state_dict())
    ref = TextBatchStream(_cfg(corpus), tok, SEQ, 4)
    _take(ref, 3)
    torch.testing.assert_close(next(one)["input_ids"], next(ref)["input_ids"], rtol=0, atol=0)
    five = TextBatchStream(_cfg(corpus), tok, SEQ, 2, dp_rank=0, dp_world=5)
    with pytest.raises(ValueError, match="do not divide"):
        five.load_state_dict(two[0].state_dict())


def test_resume_refuses_a_different_stream(corpus, tok):
    state = TextBatchStream(_cfg(corpus), tok, SEQ, 2).state_dict()
    with pytest.raises(ValueError, match="data state: seq_len"):
        TextBatchStream(_cfg(corpus), tok, SEQ * 2, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="data state: seed"):
        TextBatchStream(_cfg(corpus, seed=9), tok, SEQ, 2).load_state_dict(state)


def test_blend_follows_token_weights(corpus, tok):
    cfg = _cfg(corpus, SourceConfig(str(corpus / "a"), weight=3.0), SourceConfig(str(corpus / "b"), weight=1.0))
    s = TextBatchStream(cfg, tok, SEQ, 4)
    _take(s, 60)
    a, b = s.source_tokens
    assert a > 0 and b > 0
    longest = 200  # an upper bound on one document's tokens in this corpus
    assert abs(a - 3 * b) <= 4 * longest  # the share of tokens tracks the weights
    assert s.epochs[1] >= 1  # the small source is repeated to keep its share


def test_bad_records_counted_or_raised(corpus, tok, tmp_path):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "x.jsonl").write_text('{"text": "alpha beta"}\n{oops\n{"txt": "gamma"}\n' + '{"text": "delta"}\n' * 20)
    (src / "y.txt").write_bytes(b"")
    s = TextBatchStream(DataConfig(sources=[SourceConfig(str(src))], on_bad_record="skip"), tok, SEQ, 2)
    _take(s, 3)
    assert s.bad_records == {"malformed_json": 1, "missing_field": 1, "empty_file": 1}
    strict = TextBatchStream(DataConfig(sources=[SourceConfig(str(src))]), tok, SEQ, 2)
    with pytest.raises(ValueError, match=r"x\.jsonl:2: malformed JSON|y\.txt:1: empty file"):
        _take(strict, 3)


def test_all_bad_source_fails_clearly(tok, tmp_path):
    (tmp_path / "x.jsonl").write_text('{"no": 1}\n')
    s = TextBatchStream(DataConfig(sources=[SourceConfig(str(tmp_path))], on_bad_record="skip"), tok, SEQ, 1)
    with pytest.raises(ValueError, match=r"data\.sources\[0\]: no usable documents"):
        next(s)


def test_argument_checks(corpus, tok):
    with pytest.raises(ValueError, match="dp_rank"):
        TextBatchStream(_cfg(corpus), tok, SEQ, 1, dp_rank=2, dp_world=2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        TextBatchStream(_cfg(corpus), tok, SEQ, 0)
    with pytest.raises(ValueError, match=r"data\.on_bad_record"):
        TextBatchStream(_cfg(corpus, on_bad_record="drop"), tok, SEQ, 1)


def test_python_stdlib_default_corpus(tmp_path):
    cfg = DataConfig(sources=[SourceConfig(PYTHON_STDLIB)], tokenizer_vocab_size=300, cache_dir=str(tmp_path),
                     max_files=3)
    s = TextBatchStream(cfg, seq_len=64, micro_batch_size=2)  # trains and caches the tokenizer itself
    assert s.tokenizer.path.parent == Path(tmp_path) / "tokenizers"
    b = next(s)
    assert b["input_ids"].shape == (2, 64) and int(b["input_ids"].max()) < s.tokenizer.vocab_size
    assert len(s.files[0]) == 3 and s.bad_records == {}
