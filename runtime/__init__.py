"""edgens.runtime: on-device inference with a deployment bundle, using numpy and onnxruntime or TensorRT only.

    from edgens.runtime import Predictor
    predictor = Predictor.load("bundle")
    prediction = predictor.predict(x, deadline_ms=5)

Nothing here imports torch; onnxruntime and tensorrt are imported by their backends when first used. The bundle
format (``docs/bundle-format.md``) is read and written by :mod:`edgens.runtime.bundle`; ``docs/runtime.md``
describes the runtime.
"""

# What the Predictor is built from, then the Predictor, then what drives one (fitting, profiling, fault injection).
from edgens.runtime.bundle import (
    CalibrationInfo, Curves, EngineInfo, InputSpec, Manifest, MemberInfo, Metrics, OutlierInfo, Preprocessing,
    SelfTestInfo, SpecialistInfo, SplitMetrics, StackInfo, TrainingInfo, load_manifest, read_calibration,
    write_manifest)
from edgens.runtime.health import StackFailure, StackHealth
from edgens.runtime.latency import LatencyTable, load_latency_tables, save_latency_table
from edgens.runtime.policies import Budget
from edgens.runtime.prediction import Prediction
from edgens.runtime.selftest import SelfTestResult
from edgens.runtime.predictor import Predictor
from edgens.runtime.early_exit import fit_confidence
from edgens.runtime.faults import BitFault, Fault, inject_bit_faults, inject_faults
from edgens.runtime.profile import profile_stacks

__all__ = [
    "BitFault", "Budget", "CalibrationInfo", "Curves", "EngineInfo", "Fault", "InputSpec", "LatencyTable", "Manifest",
    "MemberInfo", "Metrics", "OutlierInfo", "Prediction", "Predictor", "Preprocessing", "SelfTestInfo",
    "SelfTestResult", "SpecialistInfo", "SplitMetrics", "StackFailure", "StackHealth", "StackInfo", "TrainingInfo",
    "fit_confidence", "inject_bit_faults", "inject_faults", "load_latency_tables", "load_manifest", "profile_stacks",
    "read_calibration", "save_latency_table", "write_manifest",
]
