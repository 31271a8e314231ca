"""vigil: ingest step — containers in, de-identified domain records and dead letters out."""

from ingest.decode import Decoder, Record, Rejected, parse_datetime, reference_id
from ingest.deid import SubjectKeyer, find_identifiers, redact
from ingest.load import IngestResult, load, reason_category
from ingest.reader import bundle_entries, iter_resources

__all__ = [
    "Decoder",
    "IngestResult",
    "Record",
    "Rejected",
    "SubjectKeyer",
    "bundle_entries",
    "find_identifiers",
    "iter_resources",
    "load",
    "parse_datetime",
    "reason_category",
    "redact",
    "reference_id",
]
