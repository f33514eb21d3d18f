"""meshlet's gRPC API: mesh.proto and its generated modules (see scripts/gen_proto.sh).

Generated code only; nothing here may hold logic. Decoding responses into model objects
happens in one place, ``meshlet.discovery_client``.
"""
