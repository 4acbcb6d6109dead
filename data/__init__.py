"""moeforge data path: sources -> tokenizer -> packing -> data-parallel batch stream.

    from data import DataConfig, load_tokenizer, TextBatchStream
    cfg = DataConfig()                      # the embedded default: Python stdlib sources
    tok = load_tokenizer(cfg)               # byte-level BPE, trained on first use and cached
    stream = TextBatchStream(cfg, tok, seq_len=256, micro_batch_size=8, dp_rank=r, dp_world=W)
    batch = next(stream)                    # input_ids / labels / doc_ids: int64 [8, 256]
    state = stream.state_dict()             # exact resume via stream.load_state_dict(state)

`tokenizers` is imported on first tokenizer use, `transformers` never.
"""

from .config import PYTHON_STDLIB, DataConfig, SourceConfig
from .loader import TextBatchStream
from .packing import IGNORE_INDEX, PackedSequence, Packer, pack_documents
from .sources import BadRecordCounter, expand_source, read_documents, stdlib_files
from .tokenizer import EOS_TOKEN, PAD_TOKEN, TextTokenizer, load_tokenizer

__all__ = [
    "PYTHON_STDLIB",
    "DataConfig",
    "SourceConfig",
    "TextBatchStream",
    "IGNORE_INDEX",
    "PackedSequence",
    "Packer",
    "pack_documents",
    "BadRecordCounter",
    "expand_source",
    "read_documents",
    "stdlib_files",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "TextTokenizer",
    "load_tokenizer",
]
