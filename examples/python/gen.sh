#!/usr/bin/env bash
# Generates the Python stubs for proto/packet_ingest.proto into examples/python/gen/.
#   pip install -r requirements.txt && ./gen.sh        (works from any directory)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")" && mkdir -p gen && "${PYTHON:-python3}" -m grpc_tools.protoc -I../../proto --python_out=gen --pyi_out=gen --grpc_python_out=gen ../../proto/packet_ingest.proto
