#!/usr/bin/env bash
# normserve from the shell with grpcurl: create a session, normalize one batch in TRAIN mode, read
# the session back, delete it. The README shows these commands; tests/e2e/test_other_languages.py
# runs this script against a real server and checks every number against torch.
#
# Needs grpcurl >= 1.8 (`pip install --require-hashes --no-deps -r examples/grpcurl/requirements.txt`
# puts one on PATH) and a server, which has reflection on, so grpcurl needs no .proto file:
#   normserve serve --address 127.0.0.1:50051 --metrics-address off
#   examples/grpcurl/demo.sh [TARGET]        # TARGET defaults to 127.0.0.1:50051
#
# Tensors are `bytes` fields: in JSON, the base64 of their raw little-endian values in row-major
# order. The input is float32 [[1, 2, 3, 4], [5, 6, 7, 8]], encoded with
#   python3 -c "import base64, struct; print(base64.b64encode(struct.pack('<8f', *range(1, 9))).decode())"
# and any tensor in an answer decodes (on a little-endian machine: x86, Arm) with
#   echo 6v9/v+v/f7/s/3+/6v9/v+z/fz/r/38/6v9/P+z/fz8= | base64 -d | od -An -tf4
# 64-bit integers (shape, version, num_batches_tracked) come back as JSON strings, as proto3's
# JSON mapping has them; requests may send them as numbers.
set -euo pipefail
TARGET="${1:-127.0.0.1:50051}"

grpcurl -plaintext -d '{"session_id": "demo", "config": {"num_features": 4, "momentum": 0.1}}' \
  "$TARGET" normserve.v1.Normalizer/CreateSession

grpcurl -plaintext -d '{"session_id": "demo", "mode": "MODE_TRAIN", "input": {"dtype": "DTYPE_FLOAT32", "shape": [2, 4], "data": "AACAPwAAAEAAAEBAAACAQAAAoEAAAMBAAADgQAAAAEE="}}' \
  "$TARGET" normserve.v1.Normalizer/Normalize

grpcurl -plaintext -d '{"session_id": "demo"}' "$TARGET" normserve.v1.Normalizer/GetSession

grpcurl -plaintext -d '{"session_id": "demo"}' "$TARGET" normserve.v1.Normalizer/DeleteSession
