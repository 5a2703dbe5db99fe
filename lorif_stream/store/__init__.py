"""The on-disk index: LMDB environment of zstd-compressed rank-c factor blocks (docs/FORMAT.md)."""
from .codec import BlockDecoder, BlockEncoder
from .format import (
    FORMAT_VERSION,
    CorruptBlockError,
    IndexCorruptError,
    IndexError_ as IndexFormatError,
    IndexWriteError,
    NotAnIndexError,
    UnsupportedVersionError,
    WriterBusyError,
    WriteRefusedError,
)
from .layout import IndexLayout, LayerShape
from .lmdb_store import BlockBuffers, IndexReader, IndexWriter, PendingBlock, Snapshot
from .shards import ShardedReader, is_sharded, open_index
from .verify import VerifyReport

__all__ = [
    "BlockBuffers", "BlockDecoder", "BlockEncoder", "CorruptBlockError", "FORMAT_VERSION", "IndexCorruptError",
    "IndexFormatError", "IndexLayout", "IndexReader", "IndexWriteError", "IndexWriter", "LayerShape", "NotAnIndexError",
    "PendingBlock", "ShardedReader", "Snapshot", "UnsupportedVersionError", "VerifyReport", "WriterBusyError",
    "WriteRefusedError", "is_sharded", "open_index",
]
