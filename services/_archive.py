"""The archive consumer: every record of every project topic, byte for byte, in Parquet files.

Layout: ``<run_dir>/archive/<topic>/part-p<partition>-<first offset>-<last offset>.parquet``; one file holds
one flush of one partition, with the columns of :data:`ARCHIVE_SCHEMA` (raw key/value bytes and headers, so a
replay from the archive is byte-identical to one from Kafka).

Idempotent: on start it derives the highest archived offset of every topic-partition from the Parquet footers
(column statistics, no data read), resumes reading right after it and skips anything at or below it, so a
restart, a re-delivery or a second run over the same topics never duplicates a record. A file appears under
its final name only once complete (written to a temporary name, then renamed).

Why Parquet files rather than DuckDB: the archive is append-only, written by one streaming process and read
by many tools. Immutable Parquet files make every flush atomic (rename) with no database lock or single
writer file to corrupt on a crash, need no server, compress raw JSON well, and are read directly by pyarrow,
pandas, Spark, Trino — and by DuckDB itself (``SELECT * FROM 'archive/*/part-*.parquet'``), so choosing
Parquet loses no DuckDB query power while DuckDB's own file format would tie every reader to DuckDB.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import structlog
from aiokafka import ConsumerRecord, TopicPartition

from services._settings import Settings
from streams import validate_topic_name

log = structlog.get_logger(__name__)

ARCHIVE_SCHEMA = pa.schema(
    [
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("timestamp_ms", pa.int64()),
        ("key", pa.binary()),
        ("value", pa.binary()),
        ("headers", pa.list_(pa.struct([("key", pa.string()), ("value", pa.binary())]))),
    ]
)
_PART = re.compile(r"^part-p(\d+)-(\d+)-(\d+)\.parquet$")


@dataclass(frozen=True)
class RawRecord:
    """One Kafka record as it was on the wire (the unit of the archive and of replays)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()

    @classmethod
    def from_kafka(cls, record: ConsumerRecord[bytes, bytes]) -> RawRecord:
        return cls(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp,
            key=record.key,
            value=record.value,
            headers=tuple((k, bytes(v)) for k, v in record.headers or ()),
        )


def archive_root(settings: Settings) -> Path:
    return settings.run_dir / "archive"


def _topic_dir(root: Path, topic: str) -> Path:
    return root / validate_topic_name(topic)  # a topic name never escapes the archive directory


def _file_max(path: Path) -> tuple[int, int]:
    """(partition, highest offset) of one archive file, from its footer statistics."""
    meta = pq.ParquetFile(path).metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    p_col, o_col = names.index("partition"), names.index("offset")
    partition, high = -1, -1
    for rg in range(meta.num_row_groups):
        p_stats, o_stats = meta.row_group(rg).column(p_col).statistics, meta.row_group(rg).column(o_col).statistics
        if p_stats is None or o_stats is None or not o_stats.has_min_max:
            table = pq.read_table(path, columns=["partition", "offset"])  # no statistics: read the two columns
            return int(table["partition"][0].as_py()), max(table["offset"].to_pylist())
        partition, high = int(p_stats.max), max(high, int(o_stats.max))
    return partition, high


def archived_high_water(root: Path, topics: list[str]) -> dict[TopicPartition, int]:
    """Highest archived offset of every topic-partition that has any file."""
    high: dict[TopicPartition, int] = {}
    for topic in topics:
        directory = _topic_dir(root, topic)
        for path in sorted(directory.glob("part-*.parquet")) if directory.is_dir() else ():
            partition, offset = _file_max(path)
            tp = TopicPartition(topic, partition)
            high[tp] = max(high.get(tp, -1), offset)
    return high


def read_archive(root: Path, topic: str) -> Iterator[RawRecord]:
    """Every archived record of ``topic`` in (partition, offset) order, duplicates dropped."""
    directory = _topic_dir(root, topic)
    files = sorted(directory.glob("part-*.parquet")) if directory.is_dir() else []
    rows: list[RawRecord] = []
    for path in files:
        for row in pq.read_table(path, schema=ARCHIVE_SCHEMA).to_pylist():
            rows.append(
                RawRecord(
                    topic=row["topic"],
                    partition=row["partition"],
                    offset=row["offset"],
                    timestamp_ms=row["timestamp_ms"],
                    key=row["key"],
                    value=row["value"],
                    headers=tuple((h["key"], h["value"]) for h in row["headers"] or ()),
                )
            )
    rows.sort(key=lambda r: (r.partition, r.offset))
    last: tuple[int, int] | None = None
    for r in rows:
        if (r.partition, r.offset) != last:
            yield r
        last = r.partition, r.offset


def _write_part(root: Path, records: list[RawRecord]) -> Path:
    first = records[0]
    directory = _topic_dir(root, first.topic)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"part-p{first.partition:05d}-{first.offset:020d}-{records[-1].offset:020d}.parquet"
    table = pa.Table.from_pydict(
        {
            "topic": [r.topic for r in records],
            "partition": [r.partition for r in records],
            "offset": [r.offset for r in records],
            "timestamp_ms": [r.timestamp_ms for r in records],
            "key": [r.key for r in records],
            "value": [r.value for r in records],
            "headers": [[{"key": k, "value": v} for k, v in r.headers] for r in records],
        },
        schema=ARCHIVE_SCHEMA,
    )
    tmp = directory / f".{name}.tmp"
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, directory / name)  # readers and restarts only ever see complete files
    return directory / name


@dataclass
class ArchiveConsumer:
    """Persists every record to Parquet; flushes every ``batch_records`` records or ``flush_interval_s``."""

    settings: Settings
    batch_records: int = 1000
    flush_interval_s: float = 5.0
    root: Path = field(init=False)
    topics: list[str] = field(init=False)
    high: dict[TopicPartition, int] = field(init=False, default_factory=dict)  # archived or buffered
    archived: int = 0
    skipped: int = 0
    files_written: int = 0
    _buffer: list[RawRecord] = field(init=False, default_factory=list)
    _lock: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)
    _ticker: asyncio.Task[None] | None = field(init=False, default=None)
    _last_flush: float = field(init=False, default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.root = archive_root(self.settings)
        self.topics = self.settings.topics.all_names()

    async def start(self) -> None:
        self.high = await asyncio.to_thread(archived_high_water, self.root, self.topics)
        self._ticker = asyncio.create_task(self._tick())
        log.info(
            "archive_started", root=str(self.root), resume={f"{k.topic}:{k.partition}": v for k, v in self.high.items()}
        )

    def start_offsets(self) -> dict[TopicPartition, int]:
        return {tp: offset + 1 for tp, offset in self.high.items()}

    async def handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        tp = TopicPartition(record.topic, record.partition)
        if record.offset <= self.high.get(tp, -1):
            self.skipped += 1
            return
        self.high[tp] = record.offset
        self._buffer.append(RawRecord.from_kafka(record))
        if len(self._buffer) >= self.batch_records:
            await self.flush()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.flush_interval_s))
            if self._buffer and time.monotonic() - self._last_flush >= self.flush_interval_s:
                await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            batch, self._buffer = self._buffer, []
            self._last_flush = time.monotonic()
            if not batch:
                return
            groups: dict[tuple[str, int], list[RawRecord]] = {}
            for r in batch:
                groups.setdefault((r.topic, r.partition), []).append(r)
            for records in groups.values():
                records.sort(key=lambda r: r.offset)
                await asyncio.to_thread(_write_part, self.root, records)
                self.files_written += 1
            self.archived += len(batch)
            log.info("archive_flushed", records=len(batch), files=len(groups))

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        await self.flush()
