"""Generated gRPC stubs of proto/chime/v1 (scripts/gen_proto.py; do not edit)."""
