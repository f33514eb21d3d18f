"""meshlet: a service mesh for containers.

This package is the shared leaf: the data model, its errors, durations and the
injected runtime (clock, randomness), plus the CLI dispatcher. It never imports a
component (control_plane, sidecar, node, certs, compose) at import time.
"""

__version__ = "0.1.0"
