"""Event codecs: JSON via msgspec, with decoding errors that say exactly what was wrong."""

from __future__ import annotations

from typing import TypeVar

import msgspec

from schemas import SCHEMA_VERSION, AnyEvent, Event, SchemaError, UnknownSchemaVersion

E = TypeVar("E", bound=Event)

_encoder = msgspec.json.Encoder()
_any_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)
_decoders: dict[type[Event], msgspec.json.Decoder[object]] = {}
MAX_EVENT_BYTES = 16 * 1024 * 1024


class _Header(msgspec.Struct):
    schema_version: int = SCHEMA_VERSION


_header_decoder = msgspec.json.Decoder(_Header)


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def _check(data: bytes) -> None:
    if len(data) > MAX_EVENT_BYTES:
        raise SchemaError(f"event of {len(data)} bytes exceeds the {MAX_EVENT_BYTES}-byte limit")
    try:
        header = _header_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SchemaError(f"not a JSON event: {exc}") from exc
    if header.schema_version > SCHEMA_VERSION:
        raise UnknownSchemaVersion(f"schema_version {header.schema_version} is newer than supported {SCHEMA_VERSION}")


def decode(data: bytes | None, event_type: type[E]) -> E:
    """Decode and validate one event of a known type; raises SchemaError with the reason."""
    if data is None:
        raise SchemaError("empty record value (tombstone)")
    _check(data)
    decoder = _decoders.get(event_type)
    if decoder is None:
        decoder = _decoders[event_type] = msgspec.json.Decoder(event_type)
    try:
        event = decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as exc:
        raise SchemaError(f"invalid {event_type.__name__}: {exc}") from exc
    assert isinstance(event, event_type)
    return event


def decode_any(data: bytes | None) -> AnyEvent:
    """Decode an event of any type (dispatch on its ``type`` tag)."""
    if data is None:
        raise SchemaError("empty record value (tombstone)")
    _check(data)
    try:
        return _any_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as exc:
        raise SchemaError(f"invalid event: {exc}") from exc
