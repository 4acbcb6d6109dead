"""Packing: documents + EOS -> one stream -> windows of seq_len+1 tokens."""

from __future__ import annotations

import random

import numpy as np
import pytest

from data.packing import IGNORE_INDEX, Packer, pack_documents

EOS = 0


def _random_docs(n: int, seed: int = 0, max_len: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        length = rng.choice([0, 1, 2, rng.randint(3, max_len), rng.randint(50, 120)])
        docs.append([rng.randint(1, 99) for _ in range(length)])
    return docs


def _stream(docs):
    tokens, owner = [], []
    for d, doc in enumerate(docs):
        tokens += list(doc) + [EOS]
        owner += [d] * (len(doc) + 1)
    return np.array(tokens), np.array(owner)


def test_hand_example():
    docs = [[1, 2, 3], [4], [5, 6]]  # stream: 1 2 3 E 4 E 5 6 E
    out = list(pack_documents(docs, seq_len=4, eos_id=EOS))
    assert len(out) == 2
    assert out[0].input_ids.tolist() == [1, 2, 3, 0]
    assert out[0].labels.tolist() == [2, 3, 0, 4]
    assert out[0].doc_ids.tolist() == [0, 0, 0, 0]
    assert out[1].input_ids.tolist() == [4, 0, 5, 6]
    assert out[1].labels.tolist() == [0, 5, 6, 0]
    assert out[1].doc_ids.tolist() == [0, 0, 1, 1]
    for s in out:
        assert s.input_ids.dtype == s.labels.dtype == s.doc_ids.dtype == np.int64


@pytest.mark.parametrize("seq_len", [1, 5, 16, 64])
def test_no_token_lost_or_duplicated(seq_len):
    docs = _random_docs(60, seed=seq_len)
    stream, owner = _stream(docs)
    out = list(pack_documents(docs, seq_len=seq_len, eos_id=EOS, drop_last=False, pad_id=-1))
    n_in = len(stream) - 1  # every stream token except the very last is an input exactly once
    assert len(out) == -(-n_in // seq_len)
    inputs = np.concatenate([s.input_ids for s in out])[:n_in]
    labels = np.concatenate([s.labels for s in out])[:n_in]
    np.testing.assert_array_equal(inputs, stream[:-1])
    np.testing.assert_array_equal(labels, stream[1:])  # labels are the next tokens
    # padding only after the end of the stream
    assert (np.concatenate([s.input_ids for s in out])[n_in:] == -1).all()
    assert (np.concatenate([s.labels for s in out])[n_in:] == IGNORE_INDEX).all()
    # one EOS per document, each at the end of its document
    assert (stream == EOS).sum() == len(docs)
    ends = np.flatnonzero(stream == EOS)
    np.testing.assert_array_equal(owner[ends], np.arange(len(docs)))
    # doc ids: the window's own document numbering, starting at 0, EOS with its document
    for w, s in enumerate(out):
        lo = w * seq_len
        hi = min(lo + seq_len, n_in)
        expect = owner[lo:hi] - owner[lo]
        np.testing.assert_array_equal(s.doc_ids[: hi - lo], expect)
        assert (s.doc_ids[hi - lo :] == -1).all()
        # a label crosses into the next document exactly where the input is EOS
        crosses = s.input_ids[: hi - lo] == EOS
        np.testing.assert_array_equal(crosses, owner[lo + 1 : hi + 1] != owner[lo:hi])


def test_drop_last_keeps_only_full_windows():
    docs = _random_docs(30, seed=3)
    stream, _ = _stream(docs)
    seq_len = 7
    out = list(pack_documents(iter(docs), seq_len=seq_len, eos_id=EOS))
    assert len(out) == (len(stream) - 1) // seq_len
    assert all(len(s.input_ids) == seq_len for s in out)
    joined = np.concatenate([s.input_ids for s in out] + [out[-1].labels[-1:]])
    np.testing.assert_array_equal(joined, stream[: len(joined)])


def test_long_document_spans_windows():
    doc = list(range(1, 36))  # 35 tokens + EOS: spans windows 0..4
    nxt = list(range(101, 111))
    out = list(pack_documents([doc, nxt], seq_len=8, eos_id=EOS))  # stream of 47 tokens
    assert len(out) == 5
    assert [int(s.doc_ids.max()) for s in out] == [0, 0, 0, 0, 1]
    assert out[4].input_ids.tolist() == [33, 34, 35, EOS, 101, 102, 103, 104]
    assert out[4].doc_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    for a, b in zip(out, out[1:]):  # adjacent windows share exactly one token
        assert b.input_ids[0] == a.labels[-1]


def test_packer_incremental_and_errors():
    p = Packer(seq_len=3, eos_id=EOS)
    assert not p.ready()
    with pytest.raises(IndexError):
        p.pop()
    p.add([1, 2])
    assert not p.ready() and p.pending_tokens == 3
    p.add([3])
    assert p.ready()
    s = p.pop()
    assert s.input_ids.tolist() == [1, 2, 0] and s.labels.tolist() == [2, 0, 3]
    assert s.doc_ids.tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        Packer(seq_len=0, eos_id=EOS)
    with pytest.raises(ValueError):
        list(pack_documents([[1]], seq_len=2, eos_id=EOS, drop_last=False))


@pytest.mark.parametrize("cut", [0, 1, 5, 17, 40])
def test_packer_state_round_trip(cut):
    """A packer restored from its (JSON) state emits exactly the windows the original would."""
    import json

    docs = _random_docs(50, seed=cut)
    seq_len = 9
    ref = list(pack_documents(docs, seq_len=seq_len, eos_id=EOS))
    p = Packer(seq_len, EOS)
    out, it = [], iter(docs)
    for doc in it:  # stop after `cut` windows, possibly with a long document half consumed
        p.add(doc)
        while p.ready() and len(out) < cut:
            out.append(p.pop())
        if len(out) == cut:
            break
    state = json.loads(json.dumps(p.state_dict()))
    q = Packer(seq_len, EOS)
    q.load_state_dict(state)
    assert q.pending_tokens == p.pending_tokens and q.windows_emitted == cut
    while q.ready():
        out.append(q.pop())
    for doc in it:
        q.add(doc)
        while q.ready():
            out.append(q.pop())
    assert len(out) == len(ref)
    for a, b in zip(out, ref):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.doc_ids, b.doc_ids)
    with pytest.raises(ValueError, match="seq_len"):
        Packer(seq_len + 1, EOS).load_state_dict(state)


def test_the_data_and_the_loss_agree_on_the_ignored_label():
    """data/ defines its own IGNORE_INDEX (it imports no model code): it must be the one the loss skips."""
    from models.head_loss import IGNORE_INDEX as LOSS_IGNORE_INDEX

    assert IGNORE_INDEX == LOSS_IGNORE_INDEX
