"""moeforge data pipeline: sources -> tokenizer -> blend -> packing -> shuffle -> data-parallel batch stream.

    from data import DataConfig, load_tokenizer, TextBatchStream
    cfg = DataConfig()                      # the embedded default: Python stdlib sources
    tok = load_tokenizer(cfg)               # byte-level BPE, trained on first use and cached
    stream = TextBatchStream(cfg, tok, seq_len=256, micro_batch_size=8, dp_rank=r, dp_world=W)
    batch = next(stream)                    # input_ids / labels / doc_ids: int64 [8, 256]
    state = stream.state_dict()             # JSON; exact resume via stream.load_state_dict(state)
    stream.bad_records                      # {"malformed_json": 3, ...} skipped with on_bad_record=skip

Modules: `config` (DataConfig, the `data` config section), `sources` (path
expansion, HF ``datasets`` streaming readers, bad-record policy), `megatron`
(.bin/.idx check, megatron-core reader, writer), `tokenizer`, `packing`,
`loader` (TextBatchStream: blend, shuffle, sharding, workers, exact state),
`preprocess` (``python -m data.preprocess``: corpus -> .bin/.idx shards).

`tokenizers` is imported on first tokenizer use, `datasets` on first read of a
text source, megatron-core on first read of a .bin/.idx source, `transformers` never.
"""

from .config import PYTHON_STDLIB, DataConfig, SourceConfig
from .errors import DataError, DataFileNotFoundError
from .loader import TextBatchStream
from .packing import IGNORE_INDEX, PackedSequence, Packer, pack_documents
from .sources import BadRecordCounter, SourceReader, expand_source, iter_documents, read_documents, stdlib_files
from .tokenizer import EOS_TOKEN, PAD_TOKEN, TextTokenizer, load_tokenizer

__all__ = [
    "PYTHON_STDLIB",
    "DataConfig",
    "SourceConfig",
    "DataError",
    "DataFileNotFoundError",
    "TextBatchStream",
    "IGNORE_INDEX",
    "PackedSequence",
    "Packer",
    "pack_documents",
    "BadRecordCounter",
    "SourceReader",
    "expand_source",
    "iter_documents",
    "read_documents",
    "stdlib_files",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "TextTokenizer",
    "load_tokenizer",
]
