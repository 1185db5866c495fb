"""The bundle format, as the runtime reads it and the exporter writes it (``docs/bundle-format.md``).

- :mod:`~edgens.runtime.bundle.types`: the constants and one dataclass per part of ``manifest.json``;
- :mod:`~edgens.runtime.bundle.json_reader`: typed JSON access whose errors name the bad key (latency tables use it
  too);
- :mod:`~edgens.runtime.bundle.parse`: the parts' parsers;
- :mod:`~edgens.runtime.bundle.manifest`: :class:`Manifest` and its named consistency checks;
- :mod:`~edgens.runtime.bundle.files`: reading and writing ``manifest.json``, file checks, the ``.npz`` files.

Nothing here imports the rest of the runtime (a test keeps it so), and nothing imports torch.
"""

from edgens.runtime.bundle.files import (SelfTestData, check_file, check_stack_files, load_manifest, read_arrays,
                                         read_calibration, read_self_test, write_manifest)
from edgens.runtime.bundle.json_reader import JsonReader, read_json_file
from edgens.runtime.bundle.manifest import CONSISTENCY_CHECKS, Manifest
from edgens.runtime.bundle.types import (
    CURVE_KEYS, F1_KEYS, FORMAT, FORMAT_VERSION, KNOWN_KEYS, MANIFEST_FILE, OPTIONAL_KEYS, ORDER_METHODS, PRECISIONS,
    ROLES, SUPPORTED_VERSIONS, CalibrationInfo, ChecksumInfo, Curves, EngineInfo, InputSpec, MemberInfo, Metrics,
    OutlierInfo, Preprocessing, SelfTestInfo, SpecialistInfo, SplitMetrics, StackInfo, TrainingInfo, utc_now)

__all__ = [
    "CONSISTENCY_CHECKS", "CURVE_KEYS", "F1_KEYS", "FORMAT", "FORMAT_VERSION", "KNOWN_KEYS", "MANIFEST_FILE",
    "OPTIONAL_KEYS", "ORDER_METHODS", "PRECISIONS", "ROLES", "SUPPORTED_VERSIONS", "CalibrationInfo", "ChecksumInfo",
    "Curves", "EngineInfo", "InputSpec", "JsonReader", "Manifest", "MemberInfo", "Metrics", "OutlierInfo",
    "Preprocessing",
    "SelfTestData", "SelfTestInfo", "SpecialistInfo", "SplitMetrics", "StackInfo", "TrainingInfo", "check_file",
    "check_stack_files", "load_manifest", "read_arrays", "read_calibration", "read_json_file", "read_self_test",
    "utc_now", "write_manifest",
]
