"""Moving policy weights over the policy topic: safetensors bytes, chunked, sha256-checked.

The byte-level helpers are pure; :class:`ChunkAssembler` gathers chunks of one version and verifies them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from schemas import IntegrityError, PolicyChunk, PolicyUpdate

DEFAULT_CHUNK_BYTES = 512 * 1024  # well under Apache Kafka's default 1 MB message limit after base64


def sha256_hex(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in blocks (a full-weights file need not fit in memory twice)."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def split_chunks(
    blob: bytes, policy_version: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES, digest: str | None = None
) -> list[PolicyChunk]:
    """Cut a weight file into ordered chunks (``digest``: its sha256, when the caller has it already).

    >>> [len(c.data) for c in split_chunks(b"x" * 10, 1, chunk_bytes=4)]
    [4, 4, 2]
    """
    digest = digest or sha256_hex(blob)
    pieces = [blob[i : i + chunk_bytes] for i in range(0, len(blob), chunk_bytes)] or [b""]
    return [
        PolicyChunk(policy_version=policy_version, index=i, total=len(pieces), sha256=digest, data=piece)
        for i, piece in enumerate(pieces)
    ]


@dataclass
class ChunkAssembler:
    """Collects the chunks announced by one PolicyUpdate; ``feed`` returns the verified bytes when complete."""

    update: PolicyUpdate
    _parts: dict[int, bytes] = field(default_factory=dict)

    def feed(self, chunk: PolicyChunk) -> bytes | None:
        if chunk.policy_version != self.update.policy_version or chunk.sha256 != self.update.sha256:
            raise IntegrityError(
                f"chunk for v{chunk.policy_version} does not belong to update v{self.update.policy_version}"
            )
        if chunk.total != self.update.n_chunks or not 0 <= chunk.index < chunk.total:
            raise IntegrityError(f"chunk index {chunk.index}/{chunk.total} disagrees with the update")
        self._parts[chunk.index] = chunk.data
        if len(self._parts) < self.update.n_chunks:
            return None
        blob = b"".join(self._parts[i] for i in range(self.update.n_chunks))
        verify_blob(blob, self.update)
        return blob


def verify_blob(blob: bytes | bytearray, update: PolicyUpdate) -> None:
    """Refuse truncated or altered weights.

    >>> u = PolicyUpdate(policy_version=1, learner_step=1, base_model="m", kind="full",
    ...                  sha256=sha256_hex(b"abc"), size_bytes=3, n_chunks=1)
    >>> verify_blob(b"abc", u)
    >>> verify_blob(b"ab", u)
    Traceback (most recent call last):
    ...
    schemas._errors.IntegrityError: policy v1: expected 3 bytes, got 2 (truncated or padded)
    """
    if len(blob) != update.size_bytes:
        raise IntegrityError(
            f"policy v{update.policy_version}: expected {update.size_bytes} bytes, got {len(blob)}"
            " (truncated or padded)"
        )
    digest = sha256_hex(blob)
    if digest != update.sha256:
        raise IntegrityError(f"policy v{update.policy_version}: sha256 {digest[:12]}… != {update.sha256[:12]}…")
