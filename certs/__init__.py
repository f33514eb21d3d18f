"""The mesh PKI: a trust anchor (root), an issuer signed by it, and short-lived SPIFFE
workload certificates (X.509-SVIDs) signed by the issuer. ECDSA P-256 everywhere.

Pure cores: ``spiffe`` (IDs), ``pki`` (building and reading certificates), ``verify``
(peer chain verification with a reason), ``schedule`` (when to renew). The I/O shells:
``cadir`` (the CA directory on disk), ``files`` (atomic writes) and ``cli``.
"""
