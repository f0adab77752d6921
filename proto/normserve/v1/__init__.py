"""Generated protobuf and gRPC modules of the normserve.v1 contract (scripts/gen-proto)."""
