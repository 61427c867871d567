from __future__ import annotations

import pytest

from schemas import IntegrityError, PolicyUpdate
from streams import ChunkAssembler, sha256_hex, split_chunks


def update_for(blob: bytes, n_chunks: int) -> PolicyUpdate:
    return PolicyUpdate(
        policy_version=3,
        learner_step=3,
        base_model="m",
        kind="full",
        sha256=sha256_hex(blob),
        size_bytes=len(blob),
        n_chunks=n_chunks,
    )


def test_chunks_reassemble_in_any_order() -> None:
    blob = bytes(range(256)) * 100
    chunks = split_chunks(blob, 3, chunk_bytes=1000)
    assembler = ChunkAssembler(update_for(blob, len(chunks)))
    results = [assembler.feed(c) for c in reversed(chunks)]
    assert results[:-1] == [None] * (len(chunks) - 1)
    assert results[-1] == blob


def test_corrupted_chunk_fails_sha256() -> None:
    blob = b"x" * 5000
    chunks = split_chunks(blob, 3, chunk_bytes=1000)
    bad = chunks[2].__class__(
        **{**{f: getattr(chunks[2], f) for f in chunks[2].__struct_fields__}, "data": b"y" * 1000}
    )
    assembler = ChunkAssembler(update_for(blob, len(chunks)))
    for c in [*chunks[:2], bad, *chunks[3:-1]]:
        assert assembler.feed(c) is None
    with pytest.raises(IntegrityError, match="sha256"):
        assembler.feed(chunks[-1])


def test_truncated_weights_are_refused() -> None:
    blob = b"x" * 5000
    chunks = split_chunks(blob[:4000], 3, chunk_bytes=1000)
    assembler = ChunkAssembler(
        PolicyUpdate(
            policy_version=3,
            learner_step=3,
            base_model="m",
            kind="full",
            sha256=chunks[0].sha256,
            size_bytes=5000,
            n_chunks=4,
        )
    )
    with pytest.raises(IntegrityError, match="truncated"):
        for c in chunks:
            assembler.feed(c)


def test_chunk_from_another_version_is_refused() -> None:
    blob = b"abc"
    other = split_chunks(blob, 9)[0]
    with pytest.raises(IntegrityError):
        ChunkAssembler(update_for(blob, 1)).feed(other)
