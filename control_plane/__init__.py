"""The control plane: the mesh's memory (services, VIPs, endpoints, nodes, policy).

Never on the request path. ``registry`` is the pure core; ``store`` persists it;
``api`` (REST) and ``discovery`` (gRPC) serve it; ``app`` wires one process.
"""
