#!/usr/bin/env bash
# The device install works on its own: build a bundle with the full install (scripts/setup.sh), then, in a fresh
# virtual environment holding only `pip install ".[runtime]"` (what goes on a Jetson-class device: numpy, click,
# tqdm, onnxruntime), check that torch and onnx are absent and run what the README promises there: `edgens --help`,
# `edgens inspect`, `edgens profile`, `edgens infer` on a .npy file and on fashion-mnist:test, and a Predictor
# prediction checked against the training run's own stored outputs (numpy). Commands that need the training extras must refuse in one
# line that names the extra (exit status 2). Everything is made in a temporary directory, removed at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/edgens-device-install.XXXXXX")
SERVER=""
trap '[ -z "$SERVER" ] || kill "$SERVER" 2>/dev/null; rm -rf "$WORK"' EXIT
FASHION=/usr/share/datasets/fashion-mnist

echo "== device install check in $WORK"
# 1. With the full install: a small real run, its bundle, and raw test images as a .npy file.
edgens train --preset mlp-16x64 --epochs 1 --train-limit 3000 --val-size 1000 --data-dir "$FASHION" \
    --out "$WORK/run" --quiet --json >/dev/null
edgens export "$WORK/run" -o "$WORK/bundle" --json >/dev/null 2>&1
"$PYTHON" - "$WORK" "$FASHION" <<'EOF'
import sys
import numpy as np
from edgens.data import load_dataset
work, fashion = sys.argv[1:]
dataset = load_dataset("fashion-mnist", data_dir=fashion, val_size=1000, train_limit=3000)
np.save(f"{work}/x.npy", dataset.test_x[:256])  # raw uint8, as a caller on the device passes them
EOF

# 2. A fresh venv with the device install only; run everything from outside the repository, so that the local
#    ./edgens folder cannot stand in for the installed package.
"$PYTHON" -m venv "$WORK/venv"
VENV_PY="$WORK/venv/bin/python"
if ! "$VENV_PY" -m pip install -q "$ROOT[runtime]" > "$WORK/pip.log" 2>&1; then
  cat "$WORK/pip.log" >&2
  exit 1
fi
cd "$WORK"
EDGENS="$WORK/venv/bin/edgens"
"$VENV_PY" - <<'EOF'
import importlib.util, sys
present = [name for name in ("torch", "onnx", "onnxscript", "matplotlib") if importlib.util.find_spec(name)]
assert not present, f"the device install pulled in {present}"
import edgens
assert edgens.__file__.startswith(sys.prefix), f"imported edgens from {edgens.__file__}, not the venv"
print("device venv: edgens", edgens.__version__, "without torch and onnx")
EOF
"$EDGENS" --help >/dev/null
"$EDGENS" inspect run >/dev/null
"$EDGENS" profile bundle --batch-sizes 1,16 --repeats 3 --warmup 1 >/dev/null
"$EDGENS" infer bundle --input x.npy --members 0.5 --json > infer-npy.json
"$EDGENS" infer bundle --input fashion-mnist:test --data-dir "$FASHION" --latency-ms 1000 --json > infer-test.json
"$VENV_PY" - <<'EOF'
import json
import numpy as np
from edgens.runtime import Predictor

npy, test = json.load(open("infer-npy.json")), json.load(open("infer-test.json"))
assert npy["examples"] == 256 and "accuracy" not in npy, npy
trained = 1 - json.load(open("run/summary.json"))["test"]["ensemble_error"]  # what training measured in torch
assert test["examples"] == 10_000 and abs(test["accuracy"] - trained) <= 1e-3, (test, trained)  # float32 ties
# The run's stored test outputs (M, N, K) give the ensemble's probabilities independently of the runtime.
eta = np.load("run/outputs/test_eta.npy")[:, :256].astype(np.float64).mean(axis=0)
expected = np.exp(eta - eta.max(axis=1, keepdims=True))
expected /= expected.sum(axis=1, keepdims=True)
with Predictor.load("bundle") as predictor:
    prediction = predictor.predict(np.load("x.npy"))
np.testing.assert_allclose(prediction.probabilities, expected, atol=1e-4)
print(f"device venv: profile, infer (npy, fashion-mnist:test accuracy {test['accuracy']:.4f}) and a prediction "
      f"matching the run's outputs (max difference {np.abs(prediction.probabilities - expected).max():.1e})")

# Silent faults without the onnx package: the self-test passes clean stacks and catches a weight changed in memory.
from edgens.runtime.faults import BitFault, inject_bit_faults
from edgens.runtime.onnx_weights import weight_tensors
with Predictor.load("bundle") as predictor:
    assert all(result.ok for result in predictor.self_test().values())
    stack = predictor.manifest.general_stacks[0]
    model = open(f"bundle/{stack.file}", "rb").read()
    # The output layer's bias (the last 3-d weight): doubling its largest class entry moves every example (a checked
    # stack's bias has two check columns after the K classes, and a check member's row of zeros last).
    bias = [t for t in weight_tensors(model) if len(t.shape) == 3][-1]
    values = np.abs(bias.values(model).reshape(bias.shape)[:len(stack.members), :, :predictor.manifest.n_outputs])
    index = np.unravel_index(int(values.argmax()), values.shape)
    fault = BitFault(bias.name, int(np.ravel_multi_index(index, bias.shape)), 23)
    with inject_bit_faults(predictor, {stack.name: [fault]}):
        assert not predictor.self_test([stack.name], quarantine=False)[stack.name].ok
print("device venv: self-test and weight fault injection without the onnx package")
EOF
# The doctor on the device install: this machine (probed for real), and a recorded Jetson read as this machine.
"$EDGENS" doctor --bundle bundle --json > doctor.json
"$EDGENS" doctor --root "$ROOT/tests/fixtures/devices/agx-orin-jp61" > doctor-agx.txt
"$VENV_PY" - <<'EOF'
import json
report = json.load(open("doctor.json"))
assert report["ok"] and report["python"]["torch"] is None, report["python"]
assert report["python"]["onnxruntime"] and not report["system"]["is_jetson"], report
text = open("doctor-agx.txt").read()
assert "Jetson AGX Orin Developer Kit: L4T 36.4.0 (JetPack 6.1)" in text, text
assert "sudo apt-get install python3-libnvinfer" in text, text
print("device venv: edgens doctor explains this machine and a recorded AGX Orin, without torch")
EOF
# 3. Commands of the training install refuse in one line naming the extra.
for command in "train --epochs 1 --out run2" "export run -o bundle2"; do
  status=0
  "$EDGENS" $command > out.txt 2> err.txt || status=$?
  if [ "$status" != 2 ] || [ "$(wc -l < err.txt)" != 1 ] || ! grep -q "pip install 'edgens\[train\]'" err.txt; then
    echo "edgens $command on the device install: expected a one-line error naming edgens[train] and exit 2," \
         "got exit $status:" >&2
    cat err.txt >&2
    exit 1
  fi
  [ ! -e run2 ] && [ ! -e bundle2 ] || { echo "edgens $command left files behind" >&2; exit 1; }
  echo "device venv: edgens ${command%% *} says: $(cat err.txt)"
done
# 4. `edgens serve` needs the serve extra: without it, one line naming it; with it (still no torch), a real server
#    answers an infer request like the Predictor over HTTP and over gRPC, and SIGTERM stops it with status 0.
status=0
"$EDGENS" serve bundle --port 0 > out.txt 2> err.txt || status=$?
if [ "$status" != 2 ] || ! grep -q "pip install 'edgens\[serve\]'" err.txt; then
  echo "edgens serve without the serve extra: expected a one-line error naming edgens[serve], got exit $status:" >&2
  cat err.txt >&2
  exit 1
fi
if ! "$VENV_PY" -m pip install -q "$ROOT[runtime,serve]" > "$WORK/pip-serve.log" 2>&1; then
  cat "$WORK/pip-serve.log" >&2
  exit 1
fi
"$EDGENS" serve bundle --port 0 --grpc-port 0 --port-file port.txt --no-access-log 2> serve.log &
SERVER=$!
for _ in $(seq 300); do [ -s port.txt ] && break; sleep 0.1; done
"$VENV_PY" - <<'EOF'
import importlib.util, json, urllib.request
import grpc
import numpy as np
from edgens.runtime import Predictor
from edgens.serve.proto import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc
assert importlib.util.find_spec("torch") is None, "the serve extra pulled in torch"
port, grpc_port = map(int, open("port.txt").read().split())
x = np.load("x.npy")[:8]
body = {"inputs": [{"name": "x", "datatype": "UINT8", "shape": list(x.shape), "data": x.reshape(-1).tolist()}],
        "parameters": {"members": 8}}
request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/bundle/infer", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
answer = json.load(urllib.request.urlopen(request, timeout=30))
probabilities = np.asarray(answer["outputs"][0]["data"]).reshape(answer["outputs"][0]["shape"])
with Predictor.load("bundle") as predictor:
    expected = predictor.predict(x, members=8).probabilities
np.testing.assert_allclose(probabilities, expected, atol=1e-5)
request = pb.ModelInferRequest(model_name="bundle", raw_input_contents=[x.tobytes()])
request.inputs.add(name="x", datatype="UINT8", shape=list(x.shape))
request.parameters["members"].int64_param = 8
with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
    reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
over_grpc = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(expected.shape)
np.testing.assert_allclose(over_grpc, expected, atol=1e-5)
print(f"device venv: edgens serve answered like the Predictor over HTTP and gRPC (max difference "
      f"{max(np.abs(probabilities - expected).max(), np.abs(over_grpc - expected).max()):.1e}), without torch")
EOF
kill -TERM "$SERVER"
status=0
wait "$SERVER" || status=$?
SERVER=""
if [ "$status" != 0 ]; then
  echo "edgens serve exited with $status after SIGTERM, expected 0:" >&2
  cat serve.log >&2
  exit 1
fi
echo "device venv: edgens serve drained and exited 0 on SIGTERM"
echo "device install check passed"
