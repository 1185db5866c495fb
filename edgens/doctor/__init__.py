"""``edgens doctor``: what this device is and whether edgens can use it, with the fix for each problem.

Three parts, each its own module: :mod:`edgens.runtime.device_info` reads the machine from its files (a Jetson's
model, L4T release, power mode, clocks, DLA cores, JetPack's packages); :mod:`edgens.doctor.probe` asks this Python
what it can import and whether onnxruntime's GPU provider really loads; :mod:`edgens.doctor.diagnose` turns both
(and a bundle's engines and latency tables) into findings. Nothing here imports torch unless torch is installed, so
the doctor runs on the device install.
"""

from edgens.doctor.diagnose import Finding, diagnose
from edgens.doctor.probe import PythonFacts, probe_python

__all__ = ["Finding", "PythonFacts", "diagnose", "probe_python"]
