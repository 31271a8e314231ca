"""``vigil run --stage ...`` as a child process of a test, against librdkafka's mock cluster.

Exactly the CLI, with one change for the mock broker: its consumers use ``kafka_mock.MockRangeAssignor`` (the range
assignment handed over 0.5 s late, because the mock answers a follower's SyncGroup with INVALID_REQUEST when the
leader's assignment arrives first — a real broker does not). Run as ``python tests/stage_process.py run ...``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kafka_mock import MockRangeAssignor  # noqa: E402

from ingest.kafka_source import KafkaSourceConfig  # noqa: E402

_options = KafkaSourceConfig.consumer_options
KafkaSourceConfig.consumer_options = lambda self: {**_options(self),
                                                   "partition_assignment_strategy": (MockRangeAssignor,)}

from vigil.cli import app  # noqa: E402

sys.argv = ["vigil", *sys.argv[1:]]
app()
