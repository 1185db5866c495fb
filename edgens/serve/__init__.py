"""edgens.serve: the bundle as an on-device service speaking the Open Inference Protocol (KServe v2) over HTTP.

Installed with the ``serve`` extra (Starlette, uvicorn, prometheus-client; no torch). :mod:`edgens.serve.protocol`
parses and writes the protocol's messages, :mod:`edgens.serve.app` serves them, :mod:`edgens.serve.server` runs the
process, and the batching itself is the runtime's (:mod:`edgens.runtime.batching`). docs/serve.md describes it.
"""
