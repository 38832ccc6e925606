"""Files of model artifacts through pyarrow's file systems (local, s3://, gs://, hdfs://, abfs://).

No torch and no Spark: the stages, the report and the training processes all read and write here.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np


def _fs(uri: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a file through pyarrow's filesystems (local, s3://, gs://, hdfs://, abfs://)."""
    fs, path = _fs(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = path + ".tmp"
    with fs.open_output_stream(tmp) as out:
        out.write(data)
    fs.move(tmp, path)


def read_bytes(uri: str) -> bytes:
    fs, path = _fs(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def delete(uri: str) -> None:
    """Delete one file; nothing when it does not exist."""
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def list_files(uri: str, suffix: str = ".parquet") -> list[str]:
    """Files under a directory (not recursive), sorted; full URIs/paths."""
    import pyarrow.fs as pafs

    fs, path = _fs(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
    prefix = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    return [prefix + n if prefix and not n.startswith(prefix) else n for n in names]


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n").encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_catalogue(uri: str, item_ids: list[str], embeddings: np.ndarray, log_q: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, d = embeddings.shape
    table = pa.table(
        {
            "item_id": pa.array(item_ids, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(np.ascontiguousarray(embeddings, np.float32).reshape(-1)), d
            ),
            "log_q": pa.array(np.asarray(log_q, np.float64)),
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(uri, buffer.getvalue())


def read_catalogue(uri: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(item ids, embeddings (n, d) float32, log q) of a catalogue file or folder of Parquet files,
    sorted by item id (the head's item index)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [uri] if uri.endswith(".parquet") else list_files(uri)
    parts = []
    for f in files:
        fs, path = _fs(f)
        with fs.open_input_file(path) as handle:
            parts.append(pq.read_table(handle))
    table = pa.concat_tables(parts, promote_options="permissive").sort_by("item_id") if parts else None
    if table is None or table.num_rows == 0:
        return [], np.zeros((0, 0), np.float32), np.zeros(0)
    n = table.num_rows
    emb = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    log_q = table.column("log_q").to_numpy() if "log_q" in table.column_names else np.zeros(n)
    return table.column("item_id").to_pylist(), emb.reshape(n, -1).astype(np.float32), log_q
