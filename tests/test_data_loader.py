"""TextBatchStream: determinism, data-parallel sharding, exact resume, blends, shuffle, workers, bad records."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from data import DataConfig, SourceConfig, TextBatchStream, load_tokenizer
from data.config import PYTHON_STDLIB
from data.sources import CHUNK_ROWS, read_documents

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
SEQ = 16


def _docs(rng, n, lo=1, hi=40):
    return [" ".join(rng.choices(WORDS, k=rng.randint(lo, hi))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

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
    c = root / "c"
    c.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"body": _docs(rng, 15, 5, 30), "n": list(range(15))}), c / f"p{i}.parquet",
                       row_group_size=4)
    return root


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    cfg = DataConfig(sources=[SourceConfig(str(corpus / "a"))], tokenizer_vocab_size=300,
                     cache_dir=str(tmp_path_factory.mktemp("cache")))
    return load_tokenizer(cfg)


def _cfg(corpus, *sources, **kw):
    srcs = [SourceConfig(str(corpus / s)) if isinstance(s, str) else s for s in (sources or ("a",))]
    return DataConfig(sources=srcs, **kw)


def _blend(corpus, **kw):
    return _cfg(corpus, "a", SourceConfig(str(corpus / "b"), weight=0.5),
                SourceConfig(str(corpus / "c"), weight=0.8, text_field="body"), **kw)


# name -> config builder; every resume/sharding test runs on each
VARIANTS = {
    "plain": lambda c: _cfg(c),
    "shuffle": lambda c: _cfg(c, shuffle_buffer=7),
    "blend": lambda c: _blend(c),
    "blend+shuffle": lambda c: _blend(c, shuffle_buffer=5, seed=3),
}


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def _rows(batches, key="input_ids"):
    return torch.cat([b[key] for b in batches]) if batches else torch.empty(0, SEQ, dtype=torch.long)


def _assert_same(xs, ys):
    assert len(xs) == len(ys)
    for a, b in zip(xs, ys):
        assert set(a) == set(b)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


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
    src = s.reader(0)
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


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_partition_the_single_rank_stream(corpus, tok, world, variant):
    cfg = VARIANTS[variant](corpus)
    m, steps = 2, 8
    single = TextBatchStream(cfg, tok, SEQ, micro_batch_size=m * world)
    ranks = [TextBatchStream(cfg, tok, SEQ, m, dp_rank=r, dp_world=world) for r in range(world)]
    seen = []
    for _ in range(steps):
        glob = next(single)
        parts = [next(r) for r in ranks]
        for key in ("input_ids", "labels", "doc_ids"):
            # rank r holds global sequences r, r+W, ...: the union is the global batch, no overlap
            together = torch.stack([p[key] for p in parts], dim=1).reshape(m * world, SEQ)
            torch.testing.assert_close(together, glob[key], rtol=0, atol=0)
        seen += [tuple(x.tolist()) for p in parts for x in torch.cat([p["input_ids"], p["labels"][:, -1:]], 1)]
        # after every batch all ranks hold the same state: the end of the same global round
        states = [r.state_dict() for r in ranks]
        assert all({k: v for k, v in st.items() if k != "dp_rank"} == {k: v for k, v in states[0].items()
                   if k != "dp_rank"} for st in states)
    assert len(seen) == len(set(seen)) == steps * m * world  # no sequence twice (windows of a finite corpus)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_exact_resume(corpus, tok, variant):
    cfg = VARIANTS[variant](corpus)
    total = 30
    full = _take(TextBatchStream(cfg, tok, SEQ, 2, dp_rank=1, dp_world=2), total)
    for stop in (0, 1, 7, 19):  # arbitrary steps, across file and epoch boundaries
        s = TextBatchStream(cfg, tok, SEQ, 2, dp_rank=1, dp_world=2)
        _take(s, stop)
        state = json.loads(json.dumps(s.state_dict()))  # checkpoint-friendly: plain JSON types
        assert state["global_sequences"] == stop * 2 * 2 and state["sequences_consumed"] == stop * 2
        resumed = TextBatchStream(cfg, tok, SEQ, 2, dp_rank=1, dp_world=2)
        resumed.load_state_dict(state)
        _assert_same(full[stop:], _take(resumed, total - stop))


def test_resume_uses_positions_not_replay(corpus, tok):
    """After load_state_dict, only the documents of the next batch (plus one chunk read ahead) are tokenized."""

    class Counting:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0
            self.vocab_size, self.eos_id = inner.vocab_size, inner.eos_id

        def encode(self, text):
            self.calls += 1
            return self.inner.encode(text)

    cfg = _cfg(corpus, shuffle_buffer=4)
    s = TextBatchStream(cfg, tok, SEQ, 2)
    _take(s, 150)  # several epochs in: ~190 documents tokenized
    counting = Counting(tok)
    resumed = TextBatchStream(cfg, counting, SEQ, 2)
    resumed.load_state_dict(s.state_dict())
    _assert_same([next(s)], [next(resumed)])
    assert counting.calls <= CHUNK_ROWS  # one chunk read ahead at most; a replay would need ~190


@pytest.mark.parametrize("saved_world,new_world", [(2, 1), (2, 5), (3, 2)])
def test_resume_under_another_world_size(corpus, tok, saved_world, new_world):
    cfg = _blend(corpus, shuffle_buffer=3)
    ref = TextBatchStream(cfg, tok, SEQ, 1)
    _take(ref, 3 * 2 * saved_world)  # the same global sequences a saved_world-rank run consumes in 3 steps
    old = [TextBatchStream(cfg, tok, SEQ, 2, dp_rank=r, dp_world=saved_world) for r in range(saved_world)]
    for r in old:
        _take(r, 3)
    new = [TextBatchStream(cfg, tok, SEQ, 1, dp_rank=r, dp_world=new_world) for r in range(new_world)]
    for r in new:
        r.load_state_dict(json.loads(json.dumps(old[-1].state_dict())))
    for _ in range(3):
        expected = next(ref)["input_ids"] if new_world == 1 else torch.cat([next(ref)["input_ids"] for _ in range(new_world)])
        got = torch.cat([next(r)["input_ids"] for r in new])
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_resume_refuses_a_different_stream(corpus, tok, tmp_path):
    state = TextBatchStream(_cfg(corpus), tok, SEQ, 2).state_dict()
    with pytest.raises(ValueError, match="data state: seq_len"):
        TextBatchStream(_cfg(corpus), tok, SEQ * 2, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="data state: seed"):
        TextBatchStream(_cfg(corpus, seed=9), tok, SEQ, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="data state: shuffle_buffer"):
        TextBatchStream(_cfg(corpus, shuffle_buffer=2), tok, SEQ, 2).load_state_dict(state)
    # the same path with other files behind it
    d = tmp_path / "a"
    d.mkdir()
    for f in sorted((corpus / "a").iterdir())[:4]:
        (d / f.name).write_bytes(f.read_bytes())
    moved = TextBatchStream(_cfg(tmp_path), tok, SEQ, 2).state_dict()
    (d / "extra.jsonl").write_text('{"text": "new"}\n')
    with pytest.raises(ValueError, match="data state: files"):
        TextBatchStream(_cfg(tmp_path), tok, SEQ, 2).load_state_dict(moved)


def test_version1_state_is_replayed(corpus, tok):
    ref = TextBatchStream(_cfg(corpus), tok, SEQ, 2, dp_rank=1, dp_world=2)
    _take(ref, 4)
    v1 = {"version": 1, "sequences_consumed": 8, "dp_rank": 1, "dp_world": 2, "seq_len": SEQ, "seed": 1234}
    s = TextBatchStream(_cfg(corpus), tok, SEQ, 2, dp_rank=1, dp_world=2)
    s.load_state_dict(v1)
    _assert_same(_take(ref, 3), _take(s, 3))


def test_state_size_is_bounded(corpus, tok):
    cfg = _cfg(corpus, shuffle_buffer=8)
    s = TextBatchStream(cfg, tok, SEQ, 2)
    sizes = []
    for _ in range(4):
        _take(s, 15)
        sizes.append(len(json.dumps(s.state_dict())))
    assert max(sizes) < 4096 and max(sizes) - min(sizes) < 512  # buffers, not history


@pytest.mark.parametrize("weights", [(3.0, 1.0), (1.0, 1.0, 6.0)])
def test_blend_follows_token_weights(corpus, tok, weights):
    names = [("a", "text"), ("b", "text"), ("c", "body")]
    cfg = _cfg(corpus, *[SourceConfig(str(corpus / n), weight=w, text_field=f) for (n, f), w in zip(names, weights)])
    s = TextBatchStream(cfg, tok, SEQ * 4, 8)
    _take(s, 60)  # ~30k tokens: several epochs of the small sources
    got = np.array(s.source_tokens[: len(weights)], dtype=float)
    share = got / got.sum()
    want = np.array(weights) / sum(weights)
    # stated tolerance: one document (<= 300 tokens here) of the total, i.e. well under 1%
    assert np.abs(share - want).max() <= 300 / got.sum() < 0.01, (share, want)
    assert min(s.epochs[: len(weights)]) >= 1


def test_workers_give_the_same_stream_and_resume(corpus, tok):
    cfg = _blend(corpus, shuffle_buffer=3)
    ref = _take(TextBatchStream(cfg, tok, SEQ, 2), 24)
    w = TextBatchStream(cfg, tok, SEQ, 2, num_workers=2)
    first = _take(w, 9)
    state = w.state_dict()  # saved with 2 workers and read-ahead in flight
    _assert_same(ref[:9], first)
    _assert_same(ref[9:16], _take(w, 7))
    w.close()
    inline = TextBatchStream(cfg, tok, SEQ, 2)  # ... loads without workers
    inline.load_state_dict(state)
    _assert_same(ref[9:24], _take(inline, 15))
    again = TextBatchStream(DataConfig(**{**cfg.__dict__, "num_workers": 1}), tok, SEQ, 2)  # and with another count
    again.load_state_dict(inline.state_dict())
    assert next(again)["input_ids"].shape == (2, SEQ)
    again.close()


def test_tokenize_workers_return_schedule_order_and_read_ahead_boundedly(tok):
    """The one worker mechanism (loader and preprocess): same results as in-process, in order,
    the schedule drawn lazily, at most PREFETCH_PER_WORKER chunks per worker ahead."""
    from data.sources import K_LINE, R_BAD, R_DOC, Row
    from data.tokenize_workers import PREFETCH_PER_WORKER, TokenizedChunks

    lines = [json.dumps({"text": f"alpha beta {i} " * (i % 5 + 1)}) if i % 7 else "{oops" for i in range(40)]
    chunk_rows = [[Row(0, c, k, K_LINE, lines[4 * c + k]) for k in range(4)] for c in range(10)]
    drawn = []

    def schedule():
        for c, rows in enumerate(chunk_rows):
            drawn.append(c)
            yield c % 2, rows

    inline = list(TokenizedChunks(schedule(), tok, ["text", "text"], 0))
    assert [slot for slot, _ in inline] == [c % 2 for c in range(10)]
    assert [r.kind for _, res in inline for r in res] == [R_BAD if i % 7 == 0 else R_DOC for i in range(40)]
    drawn.clear()
    workers = TokenizedChunks(schedule(), tok, ["text", "text"], 2)
    got = [next(workers)]
    assert len(drawn) <= 2 * PREFETCH_PER_WORKER + 1  # not the whole schedule
    got += list(workers)
    workers.close()
    assert [(s, [(r.epoch, r.file, r.rec, r.kind) for r in res]) for s, res in got] == \
        [(s, [(r.epoch, r.file, r.rec, r.kind) for r in res]) for s, res in inline]
    docs = [(a.value, b.value) for (_, x), (_, y) in zip(got, inline) for a, b in zip(x, y) if a.kind == R_DOC]
    assert all(np.array_equal(a, b) for a, b in docs) and docs
    with pytest.raises(ValueError, match=r"num_workers must be >= 0, got -1"):
        TokenizedChunks(schedule(), tok, ["text"], -1)


def _bad_corpus(root: Path) -> Path:
    src = root / "bad"
    src.mkdir()
    (src / "x.jsonl").write_text('{"text": "alpha beta"}\n{oops\n{"txt": "gamma"}\n' + '{"text": "delta"}\n' * 20)
    (src / "y.txt").write_bytes(b"")
    (src / "z.jsonl").write_bytes(b'{"text": "eta \xff theta"}\n' + b'{"text": "iota"}\n' * 10)
    return src


def test_bad_records_counted_or_raised(corpus, tok, tmp_path):
    src = _bad_corpus(tmp_path)
    s = TextBatchStream(DataConfig(sources=[SourceConfig(str(src))], on_bad_record="skip"), tok, SEQ, 2)
    while s.epochs[0] < 2:  # two whole epochs: every bad record passed twice (a third time at most)
        next(s)
    assert set(s.bad_records) == {"malformed_json", "missing_field", "empty_file", "undecodable_bytes"}
    assert all(n in (2, 3) for n in s.bad_records.values()), s.bad_records
    strict = TextBatchStream(DataConfig(sources=[SourceConfig(str(src))]), tok, SEQ, 2)
    with pytest.raises(ValueError, match=r"x\.jsonl:2: malformed JSON|y\.txt:1: empty file|z\.jsonl:1: undecodable"):
        _take(strict, 4)


def test_bad_record_counts_resume_exactly(tok, tmp_path):
    src = _bad_corpus(tmp_path)
    cfg = DataConfig(sources=[SourceConfig(str(src))], on_bad_record="skip", shuffle_buffer=2)
    full = TextBatchStream(cfg, tok, SEQ, 1)
    ref = _take(full, 30)
    for stop in (1, 5, 17):
        s = TextBatchStream(cfg, tok, SEQ, 1)
        _take(s, stop)
        r = TextBatchStream(cfg, tok, SEQ, 1)
        r.load_state_dict(json.loads(json.dumps(s.state_dict())))
        assert r.bad_records == s.bad_records
        _assert_same(ref[stop:], _take(r, 30 - stop))
        assert r.bad_records == full.bad_records  # counted once per epoch read, not twice


def test_missing_source_path_policy(corpus, tok, tmp_path):
    cfg = _cfg(corpus, "a", SourceConfig(str(tmp_path / "gone"), weight=2.0))
    with pytest.raises(ValueError, match=r"data\.sources\[1\]\.path: .*gone.* does not exist"):
        TextBatchStream(cfg, tok, SEQ, 1)
    cfg.on_bad_record = "skip"
    s = TextBatchStream(cfg, tok, SEQ, 1)  # left out of the blend, counted, logged
    assert s.bad_records == {"missing_path": 1}
    assert s.weights == [1.0, 0.0]
    _take(s, 3)
    only = DataConfig(sources=[SourceConfig(str(tmp_path / "gone"))], on_bad_record="skip")
    with pytest.raises(ValueError, match="nothing to read"):
        TextBatchStream(only, tok, SEQ, 1)


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_file_vanishing_mid_run(corpus, tok, tmp_path, policy):
    d = tmp_path / "v"
    d.mkdir()
    for f in sorted((corpus / "a").iterdir()):
        (d / f.name).write_bytes(f.read_bytes())
    s = TextBatchStream(DataConfig(sources=[SourceConfig(str(d))], on_bad_record=policy), tok, SEQ, 1)
    next(s)
    for f in d.iterdir():
        f.unlink()
    if policy == "error":
        with pytest.raises(ValueError, match=r"part\d\.jsonl:1: missing file"):
            _take(s, 1000)
    else:  # the files still to come are counted; a whole epoch without documents then stops the run
        with pytest.raises(ValueError, match=r"no usable documents"):
            _take(s, 1000)
        assert s.bad_records["missing_file"] >= 4 + 5


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
    with pytest.raises(ValueError, match=r"data\.shuffle_buffer"):
        TextBatchStream(_cfg(corpus, shuffle_buffer=-1), tok, SEQ, 1)


def test_python_stdlib_default_corpus(tmp_path):
    cfg = DataConfig(sources=[SourceConfig(PYTHON_STDLIB)], tokenizer_vocab_size=300, cache_dir=str(tmp_path),
                     max_files=3)
    s = TextBatchStream(cfg, seq_len=64, micro_batch_size=2)  # trains and caches the tokenizer itself
    assert s.tokenizer.path.parent == Path(tmp_path) / "tokenizers"
    b = next(s)
    assert b["input_ids"].shape == (2, 64) and int(b["input_ids"].max()) < s.tokenizer.vocab_size
    assert len(s.files[0]) == 3 and s.bad_records == {}
