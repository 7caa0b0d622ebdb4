"""Document packing: fixed-length rows with ``segment_ids`` (0 = padding, docs 1, 2, ...).

A corpus is a token stream with a parallel stream of document ids (non-decreasing).
Row ``i`` is the window ``[i*T, i*T + T + 1)`` of both streams: inputs are its first T
tokens, targets the last T. A document cut by a row boundary continues, as a new
segment, in the next row. A target carries loss weight only when it belongs to the same
document as its input, so no token is ever trained to predict another document.
"""

from __future__ import annotations

import numpy as np


def single_segment(seq_len: int) -> dict[str, np.ndarray]:
    """segment_ids/positions of a row holding one document."""
    return dict(segment_ids=np.ones(seq_len, np.int32), positions=np.arange(seq_len, dtype=np.int32))


def segments_and_positions(doc_ids_T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumbers document ids to segments 1, 2, ... and gives positions within each."""
    doc_ids_T = np.asarray(doc_ids_T)
    new = np.ones(doc_ids_T.shape, bool)
    new[1:] = doc_ids_T[1:] != doc_ids_T[:-1]
    segment_ids = np.cumsum(new).astype(np.int32)
    idx = np.arange(doc_ids_T.shape[0])
    starts = np.maximum.accumulate(np.where(new, idx, 0))
    return segment_ids, (idx - starts).astype(np.int32)


def row_to_example(tokens_T1: np.ndarray, doc_ids_T1: np.ndarray) -> dict[str, np.ndarray]:
    """A packed row of T+1 tokens and document ids -> one training example of length T."""
    tokens_T1, doc_ids_T1 = np.asarray(tokens_T1), np.asarray(doc_ids_T1)
    segment_ids, positions = segments_and_positions(doc_ids_T1[:-1])
    return dict(
        inputs=tokens_T1[:-1].astype(np.int32),
        targets=tokens_T1[1:].astype(np.int32),
        weights=(doc_ids_T1[1:] == doc_ids_T1[:-1]).astype(np.float32),
        segment_ids=segment_ids,
        positions=positions,
    )


def pack_documents(docs: list[np.ndarray], bos: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Concatenates documents (optionally each prefixed by ``bos``) into token/doc-id streams."""
    if bos is not None:
        docs = [np.concatenate([np.array([bos], np.int32), d.astype(np.int32)]) for d in docs]
    if not docs:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    tokens = np.concatenate(docs).astype(np.int32)
    doc_ids = np.repeat(np.arange(len(docs), dtype=np.int64), [len(d) for d in docs])
    return tokens, doc_ids


def num_rows(stream_len: int, seq_len: int) -> int:
    """Number of full rows (each needs T+1 tokens; consecutive rows share one token)."""
    return max(0, (stream_len - 1) // seq_len)
