"""vigil: ingest step — containers in, de-identified domain records and dead letters out."""

from ingest.decode import Decoder, Record, Rejected, parse_datetime, reference_id
from ingest.deid import SubjectKeyer, find_identifiers, redact
from ingest.load import IngestResult, decode_items, load, load_messages, reason_category
from ingest.reader import bundle_entries, iter_message, iter_resources
from ingest.sources import Checkpoint, Message, Source

__all__ = [
    "Checkpoint",
    "Decoder",
    "IngestResult",
    "Message",
    "Source",
    "decode_items",
    "Record",
    "Rejected",
    "SubjectKeyer",
    "bundle_entries",
    "find_identifiers",
    "iter_message",
    "iter_resources",
    "load",
    "load_messages",
    "parse_datetime",
    "reason_category",
    "redact",
    "reference_id",
]
