#!/usr/bin/env bash
# Regenerate meshlet/proto/mesh_pb2{,_grpc}.py and mesh_pb2.pyi from mesh.proto.
# Run from anywhere; the generated files are committed (users need no grpcio-tools).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
  meshlet/proto/mesh.proto
echo "gen_proto: regenerated meshlet/proto/mesh_pb2.py, mesh_pb2.pyi, mesh_pb2_grpc.py"
