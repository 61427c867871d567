"""The Kafka layer: topics, codecs, producers/consumers, the faust app, dead letters, weight transport."""

from streams._client import (
    Publisher,
    ensure_topics,
    make_consumer,
    make_producer,
    read_from_start,
    stop_consumer,
    wait_for_broker,
)
from streams._codec import MAX_EVENT_BYTES, decode, decode_any, encode
from streams._config import KafkaConfig
from streams._dlq import DeadLetterSink, dead_letter_for
from streams._faust import make_app
from streams._topics import Topics, TopicSpec, validate_topic_name
from streams._weights import ChunkAssembler, file_sha256, sha256_hex, split_chunks, verify_blob

__all__ = [
    "MAX_EVENT_BYTES",
    "ChunkAssembler",
    "DeadLetterSink",
    "KafkaConfig",
    "Publisher",
    "TopicSpec",
    "Topics",
    "dead_letter_for",
    "decode",
    "decode_any",
    "encode",
    "ensure_topics",
    "file_sha256",
    "make_app",
    "make_consumer",
    "make_producer",
    "read_from_start",
    "sha256_hex",
    "split_chunks",
    "stop_consumer",
    "validate_topic_name",
    "verify_blob",
    "wait_for_broker",
]
