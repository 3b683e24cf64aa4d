"""``deepspeed.runtime.data_pipeline.data_sampling.indexed_dataset``: ds-data reads and writes
the same index files; ``MMapIndexedDataset(path)`` opens one (rows as numpy arrays)."""

from ds_data import IndexedRows


def MMapIndexedDataset(path: str, skip_warmup: bool = False) -> IndexedRows:  # noqa: N802
    """DeepSpeed's reader's name: the rows of ``path.bin``/``path.idx``."""
    del skip_warmup  # the file is memory-mapped lazily either way
    return IndexedRows(path)


__all__ = ["IndexedRows", "MMapIndexedDataset"]
