"""node: the node helper — one host's share of the VXLAN overlay, and its containers.

``plan`` (pure: desired kernel state and the operations to reach it) and ``leases`` (pure:
container addresses) decide; ``netlink`` (pyroute2) reads and changes the kernel; ``app``
runs `meshlet node run` (register, watch the node map, heartbeat, re-sync); ``attach``
plugs container namespaces in; ``state`` keeps the files in the state directory; ``cli``
parses flags. The lab (``lab*`` modules) builds nodes and containers on one machine.
"""
