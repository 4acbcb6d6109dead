"""Sources: path expansion, document reading, the bad-record policy, DataConfig checks."""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import sysconfig
from pathlib import Path

import pytest

from data.config import PYTHON_STDLIB, DataConfig, SourceConfig
from data.sources import BadRecordCounter, expand_source, read_documents, stdlib_files


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def _jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


# -- expansion -----------------------------------------------------------------------


def test_expand_file_glob_directory(tmp_path):
    a = _write(tmp_path / "c" / "b.txt", "b")
    b = _write(tmp_path / "c" / "a.jsonl", _jsonl({"text": "a"}))
    c = _write(tmp_path / "c" / "sub" / "z.py", "z = 1")
    _write(tmp_path / "c" / "notes.md", "ignored in directories")
    _write(tmp_path / "c" / ".hidden" / "h.txt", "hidden dirs are skipped")
    d = _write(tmp_path / "c" / "sub" / "y.jsonl.gz", _jsonl({"text": "y"}))

    assert expand_source(SourceConfig(str(a))) == [str(a)]
    assert expand_source(SourceConfig(str(tmp_path / "c"))) == sorted(map(str, [a, b, c, d]))
    assert expand_source(SourceConfig(str(tmp_path / "c" / "*.txt"))) == [str(a)]
    assert expand_source(SourceConfig(str(tmp_path / "c" / "**" / "*.jsonl*"))) == sorted(map(str, [b, d]))
    # max_files keeps an evenly spread, deterministic subset
    assert expand_source(SourceConfig(str(tmp_path / "c")), max_files=2) == sorted(map(str, [a, b, c, d]))[::2]


def test_expand_errors_name_source_and_path(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match=r"data\.sources\[2\]\.path: .*nope\.jsonl.* does not exist"):
        expand_source(SourceConfig(missing), index=2)
    with pytest.raises(ValueError, match=r"data\.sources\[0\]\.path: glob .* matched no files"):
        expand_source(SourceConfig(str(tmp_path / "*.jsonl")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"data\.sources\[0\]\.path: directory .* holds no files"):
        expand_source(SourceConfig(str(tmp_path / "empty")))
    _write(tmp_path / "x.csv", "a,b")
    with pytest.raises(ValueError, match="unknown format"):
        expand_source(SourceConfig(str(tmp_path / "x.csv")))
    _write(tmp_path / "m.bin", b"")
    with pytest.raises(ValueError, match=r"m\.idx: does not exist \(a Megatron dataset needs both"):
        expand_source(SourceConfig(str(tmp_path / "m")))


def test_expand_skip_policy_counts_problems(tmp_path):
    good = _write(tmp_path / "g" / "a.jsonl", _jsonl({"text": "a"}))
    _write(tmp_path / "g" / "b.csv", "x")
    _write(tmp_path / "g" / "half.idx", b"")
    counter = BadRecordCounter()
    files = expand_source(SourceConfig(str(tmp_path / "g" / "*")), on_bad_record="skip", counter=counter)
    assert files == [str(good)]
    assert counter.as_dict() == {"unsupported_format": 1, "missing_file": 1}
    assert expand_source(SourceConfig(str(tmp_path / "nope")), on_bad_record="skip", counter=counter) == []
    assert counter.as_dict()["missing_path"] == 1


def test_expand_megatron_and_parquet_entries(tmp_path):
    for name in ("s0", "s1"):
        _write(tmp_path / "m" / f"{name}.bin", b"")
        _write(tmp_path / "m" / f"{name}.idx", b"")
    pq_file = _write(tmp_path / "m" / "t.parquet", b"PAR1")
    b0, b1 = str(tmp_path / "m" / "s0.bin"), str(tmp_path / "m" / "s1.bin")
    # a prefix, either file, a glob over either suffix, a directory: each pair once, as PREFIX.bin
    assert expand_source(SourceConfig(str(tmp_path / "m" / "s0"))) == [b0]
    assert expand_source(SourceConfig(str(tmp_path / "m" / "s0.idx"))) == [b0]
    assert expand_source(SourceConfig(str(tmp_path / "m" / "*.idx"))) == [b0, b1]
    assert expand_source(SourceConfig(str(tmp_path / "m" / "s*"))) == [b0, b1]
    assert expand_source(SourceConfig(str(tmp_path / "m"))) == sorted([b0, b1, str(pq_file)])


def test_remote_urls_through_fsspec(tmp_path):
    a = _write(tmp_path / "r" / "a.jsonl", _jsonl({"text": "one"}, {"text": "two"}))
    _write(tmp_path / "r" / "b.jsonl.gz", _jsonl({"text": "three"}))
    url = f"file://{tmp_path}/r/*.jsonl*"
    files = expand_source(SourceConfig(url))
    assert files == [f"file://{tmp_path}/r/a.jsonl", f"file://{tmp_path}/r/b.jsonl.gz"]
    assert [d for f in files for d in read_documents(f)] == ["one", "two", "three"]
    assert expand_source(SourceConfig(f"file://{a}")) == [f"file://{a}"]  # no glob: taken as is
    with pytest.raises(ValueError, match="matched no files"):
        expand_source(SourceConfig(f"file://{tmp_path}/r/*.parquet"))
    with pytest.raises(ValueError, match="must be local"):
        expand_source(SourceConfig("https://example.invalid/x.bin"))


def test_stdlib_files():
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [Path(f).relative_to(root).as_posix() for f in files]
    assert len(files) > 100 and rel == sorted(rel)
    assert "os.py" in rel and "json/decoder.py" in rel
    for r in rel:
        parts = r.split("/")
        assert r.endswith(".py")
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts[:-1]), r
    assert all(os.path.getsize(f) > 0 for f in files)
    assert expand_source(SourceConfig(PYTHON_STDLIB)) == files
    assert expand_source(SourceConfig(PYTHON_STDLIB), max_files=3) == [files[0], files[len(files) // 3], files[2 * len(files) // 3]]


# -- reading -------------------------------------------------------------------------


def test_read_documents_formats(tmp_path):
    t = _write(tmp_path / "a.txt", "\ufeffline 1\nline 2\n")
    assert list(read_documents(str(t))) == ["line 1\nline 2\n"]  # one document, BOM dropped
    j = _write(tmp_path / "a.jsonl", _jsonl({"text": "one"}, "", {"text": "two", "x": 1}) + "\n")
    assert list(read_documents(str(j))) == ["one", "two"]  # blank lines are not records
    g = _write(tmp_path / "a.jsonl.gz", _jsonl({"body": "é ✓"}, {"body": "b"}))
    assert list(read_documents(str(g), text_field="body")) == ["é ✓", "b"]
    # raw U+2028 inside a JSON string is not a line break; CRLF line ends are
    u = _write(tmp_path / "u.jsonl", '{"text": "a\u2028b"}\r\n{"text": "c"}\r\n')
    assert list(read_documents(str(u))) == ["a\u2028b", "c"]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": ["x", "y ✓", "z"], "id": [1, 2, 3]}), p, row_group_size=2)
    assert list(read_documents(str(p), text_field="body")) == ["x", "y ✓", "z"]


def test_reader_positions_resume_inside_a_file(tmp_path):
    from data.sources import R_DOC, SourceReader, chunks, next_position, process_rows

    files = [str(_write(tmp_path / f"f{i}.jsonl", _jsonl(*({"text": f"{i}-{k}"} for k in range(7)), "", GOOD)))
             for i in range(3)]
    reader = SourceReader(0, files, seed=5)
    rows = [r for c in chunks(reader.rows(epochs=2), max_rows=5) for r in process_rows(c, "text")]
    texts = [r.value for r in rows]
    assert len(texts) == 2 * 3 * 8 and sorted(texts[:24]) == sorted(texts[24:])
    for cut in (0, 3, 7, 8, 20, 30):  # a reader started at the position after row `cut` continues exactly
        r = rows[cut]
        pos = next_position(r.epoch, r.file, r.rec, r.kind)
        again = [r.value for c in chunks(reader.rows(*pos, epochs=2)) for r in process_rows(c, "text")]
        assert again == texts[cut + 1 :]
    assert all(r.kind == R_DOC for r in rows)


GOOD = {"text": "good"}
# name -> (file name, content, reason, line of the bad record, good documents around it)
BAD_CASES = {
    "malformed_json": ("m.jsonl", _jsonl(GOOD, GOOD, '{"text": "unterminated', GOOD), "malformed_json", 3, 3),
    "missing_field": ("f.jsonl", _jsonl(GOOD, {"content": "x"}), "missing_field", 2, 1),
    "not_an_object": ("o.jsonl", _jsonl('["text"]', GOOD), "not_an_object", 1, 1),
    "wrong_field_type": ("w.jsonl", _jsonl(GOOD, {"text": 5}), "wrong_field_type", 2, 1),
    "empty_document": ("e.jsonl", _jsonl(GOOD, {"text": ""}), "empty_document", 2, 1),
    "undecodable_jsonl": ("u.jsonl", _jsonl(GOOD).encode() + b'{"text": "\xff\xfe"}\n', "undecodable_bytes", 2, 1),
    "undecodable_txt": ("u.txt", b"ok\nok\nbad \xc3\x28 byte\n", "undecodable_bytes", 3, 0),
    "empty_txt": ("e.txt", b"", "empty_file", 1, 0),
    "blank_txt": ("b.py", b"\n  \n", "empty_file", 1, 0),
    "empty_jsonl": ("e2.jsonl", b"\n\n", "empty_file", 1, 0),
    "corrupt_gz": ("c.jsonl.gz", None, "corrupt_file", 1, 0),
    "truncated_gz": ("t.jsonl.gz", "TRUNC", "corrupt_file", None, None),
    "parquet_missing_column": ("m.parquet", {"body": ["good"]}, "missing_field", "", 0),
    "parquet_null": ("n.parquet", {"text": ["good", None, "good"]}, "missing_field", ": row 1", 2),
    "parquet_wrong_type": ("w.parquet", {"text": [5]}, "wrong_field_type", ": row 0", 0),
    "parquet_empty_doc": ("e.parquet", {"text": ["", "good"]}, "empty_document", ": row 0", 1),
    "parquet_no_rows": ("z.parquet", {"text": []}, "empty_file", "", 0),
    "parquet_corrupt": ("c.parquet", b"PAR1 not really", "corrupt_file", "", 0),
}


def _bad_file(tmp_path, case):
    name, content, *_ = BAD_CASES[case]
    p = tmp_path / name
    if content is None:  # not gzip data at all
        p.write_bytes(b"this is not gzip")
        return p
    if content == "TRUNC":  # a gzip cut short after many good lines
        data = gzip.compress(_jsonl(*[GOOD] * 60000).encode(), mtime=0)  # ~1 MB of lines
        p.write_bytes(data[: len(data) // 2])
        return p
    if isinstance(content, dict):
        import pyarrow as pa
        import pyarrow.parquet as pq

        col = next(iter(content.values()))
        typ = pa.int64() if col and isinstance(col[0], int) else pa.string()
        pq.write_table(pa.table({k: pa.array(v, type=typ) for k, v in content.items()}), p)
        return p
    return _write(p, content)


def _where(path, line):
    return f"{path}{line}" if isinstance(line, str) else f"{path}:{line}"


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_error_names_file_and_line(tmp_path, case):
    path = _bad_file(tmp_path, case)
    _, _, reason, line, _ = BAD_CASES[case]
    with pytest.raises(ValueError) as e:
        list(read_documents(str(path), on_bad_record="error"))
    msg = str(e.value)
    if line is None:  # somewhere inside: a line number after the good lines read
        assert re.search(re.escape(str(path)) + r":\d+:", msg), msg
    else:
        assert f"{_where(path, line)}:" in msg
    assert reason.replace("_", " ") in msg
    assert "data.on_bad_record=skip" in msg


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_skip_counts(tmp_path, case, caplog):
    path = _bad_file(tmp_path, case)
    _, _, reason, line, n_good = BAD_CASES[case]
    counter = BadRecordCounter()
    with caplog.at_level(logging.WARNING, logger="data.sources"):
        docs = list(read_documents(str(path), on_bad_record="skip", counter=counter))
    if n_good is None:
        assert 0 < len(docs) < 60000 and set(docs) == {"good"}
    else:
        assert docs == ["good"] * n_good
    assert counter.as_dict() == {reason: 1}
    assert (str(path) if line is None else _where(path, line)) in caplog.text


def test_counter_logs_only_the_first_few(caplog):
    c = BadRecordCounter(max_logged=3)
    with caplog.at_level(logging.WARNING, logger="data.sources"):
        for i in range(10):
            c.record("malformed_json", f"f.jsonl:{i + 1}")
    assert c.as_dict() == {"malformed_json": 10} and c.total == 10
    assert "f.jsonl:3" in caplog.text and "f.jsonl:4" not in caplog.text
    assert "not logged" in caplog.text


# -- config ----------------------------------------------------------------------------


def test_config_defaults_and_validate():
    cfg = DataConfig()
    cfg.validate()
    assert [s.path for s in cfg.sources] == [PYTHON_STDLIB] and cfg.on_bad_record == "error"

    def bad(match, **kw):
        with pytest.raises(ValueError, match=match):
            DataConfig(**kw).validate()

    bad(r"^data\.on_bad_record:", on_bad_record="ignore")
    bad(r"^data\.sources\[1\]\.weight:", sources=[SourceConfig("a"), SourceConfig("b", weight=0.0)])
    bad(r"^data\.sources\[0\]\.weight:", sources=[SourceConfig("a", weight=float("nan"))])
    bad(r"^data\.sources\[0\]\.path:", sources=[SourceConfig("")])
    bad(r"^data\.sources\[0\]\.text_field:", sources=[SourceConfig("a", text_field="")])
    bad(r"^data\.sources:", sources=[])
    bad(r"^data\.tokenizer_vocab_size:", tokenizer_vocab_size=100)
    bad(r"^data\.max_files:", max_files=0)
    bad(r"^data\.shuffle_buffer:", shuffle_buffer=-1)
    bad(r"^data\.num_workers:", num_workers=-2)
    assert (cfg.shuffle_buffer, cfg.num_workers) == (0, 0)


def test_config_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEFORGE_CACHE", str(tmp_path / "env"))
    assert DataConfig().resolved_cache_dir() == tmp_path / "env"
    assert DataConfig(cache_dir=str(tmp_path / "cfg")).resolved_cache_dir() == tmp_path / "cfg"
    monkeypatch.delenv("MOEFORGE_CACHE")
    assert DataConfig().resolved_cache_dir() == Path.home() / ".cache" / "moeforge"


def test_config_is_an_omegaconf_schema():
    omegaconf = pytest.importorskip("omegaconf")
    OmegaConf = omegaconf.OmegaConf
    schema = OmegaConf.structured(DataConfig)
    merged = OmegaConf.merge(schema, OmegaConf.from_dotlist(["on_bad_record=skip", "max_files=5", "num_workers=2",
                                                             "shuffle_buffer=64"]))
    merged = OmegaConf.merge(merged, {"sources": [{"path": "a.jsonl", "weight": 2}, {"path": "b"}]})
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, DataConfig) and isinstance(cfg.sources[1], SourceConfig)
    assert cfg.sources[0].weight == 2.0 and cfg.sources[1].text_field == "text" and cfg.max_files == 5
    assert (cfg.num_workers, cfg.shuffle_buffer) == (2, 64)
    cfg.validate()
    with pytest.raises(omegaconf.errors.OmegaConfBaseException):
        OmegaConf.merge(schema, {"sources": [{"path": "a", "bogus": 1}]})
