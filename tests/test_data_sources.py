"""Sources: path expansion, document reading, the bad-record policy, DataConfig checks."""

from __future__ import annotations

import gzip
import json
import logging
import os
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
    _write(tmp_path / "x.parquet", b"PAR1")
    with pytest.raises(ValueError, match="not supported yet"):
        expand_source(SourceConfig(str(tmp_path / "x.parquet")))
    _write(tmp_path / "x.csv", "a,b")
    with pytest.raises(ValueError, match="unknown format"):
        expand_source(SourceConfig(str(tmp_path / "x.csv")))


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
}


def _bad_file(tmp_path, case):
    name, content, *_ = BAD_CASES[case]
    if content is None:  # not gzip data at all
        p = tmp_path / name
        p.write_bytes(b"this is not gzip")
        return p
    return _write(tmp_path / name, content)


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_error_names_file_and_line(tmp_path, case):
    path = _bad_file(tmp_path, case)
    _, _, reason, line, _ = BAD_CASES[case]
    with pytest.raises(ValueError) as e:
        list(read_documents(str(path), on_bad_record="error"))
    msg = str(e.value)
    assert f"{path}:{line}:" in msg
    assert reason.replace("_", " ") in msg
    assert "data.on_bad_record=skip" in msg


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_skip_counts(tmp_path, case, caplog):
    path = _bad_file(tmp_path, case)
    _, _, reason, line, n_good = BAD_CASES[case]
    counter = BadRecordCounter()
    with caplog.at_level(logging.WARNING, logger="data.sources"):
        docs = list(read_documents(str(path), on_bad_record="skip", counter=counter))
    assert docs == ["good"] * n_good
    assert counter.as_dict() == {reason: 1}
    assert f"{path}:{line}" in caplog.text


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
    merged = OmegaConf.merge(schema, OmegaConf.from_dotlist(["on_bad_record=skip", "max_files=5"]))
    merged = OmegaConf.merge(merged, {"sources": [{"path": "a.jsonl", "weight": 2}, {"path": "b"}]})
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, DataConfig) and isinstance(cfg.sources[1], SourceConfig)
    assert cfg.sources[0].weight == 2.0 and cfg.sources[1].text_field == "text" and cfg.max_files == 5
    cfg.validate()
    with pytest.raises(omegaconf.errors.OmegaConfBaseException):
        OmegaConf.merge(schema, {"sources": [{"path": "a", "bogus": 1}]})
