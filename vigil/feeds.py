"""Build the configured stream sources (DESIGN.md §Contracts: ``vigil run --config FILE``).

File sources (``kind: files``) are not built here: a bulk export holds one file per resource type, not one stream in
arrival order, so ``vigil run`` reads them whole and sorts them (``Pipeline.run_paths``). Subscription sources are
served by ``vigil serve`` (``vigil.webhook``), which forwards the notified resources to a Kafka topic: configure a
``kafka`` source on that topic and ``vigil run`` consumes them with the other feeds, in one pipeline.
"""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from ingest import Source, SubjectKeyer
from ingest.bulk_export import BulkDirectorySource, BulkDirectorySourceConfig, BulkExportSource, BulkExportSourceConfig
from ingest.kafka_source import KafkaSource, KafkaSourceConfig
from ingest.rest_poll import RestPollSource, RestPollSourceConfig
from vigil.offsets import lookup_offsets
from vigil.settings import Settings

STREAM_KINDS = ("kafka", "fhir-bulk-export", "bulk-directory", "fhir-rest")


def stream_sources(settings: Settings, factory: sessionmaker[Session]) -> list[Source]:
    """One ``Source`` per configured stream source, in config order."""
    built: list[Source] = []
    for cfg in settings.sources:
        if isinstance(cfg, KafkaSourceConfig):
            built.append(KafkaSource(cfg, offsets_lookup=lookup_offsets(factory, cfg.name)))
        elif isinstance(cfg, BulkExportSourceConfig):
            built.append(BulkExportSource(cfg))
        elif isinstance(cfg, BulkDirectorySourceConfig):
            built.append(BulkDirectorySource(cfg))
        elif isinstance(cfg, RestPollSourceConfig):
            built.append(RestPollSource(cfg, keyer=SubjectKeyer(settings.subject_key)))  # cursor ids keyed
    return built
