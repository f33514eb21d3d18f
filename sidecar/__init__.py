"""The sidecar: the per-container proxy (listeners, relay, mTLS, balancing, breaking,
retries, DNS, interception, admin). Pure cores (catalog, balancer, outlier, breaker,
dns answers, nft rules) never import asyncio, socket or ssl; the shells do the I/O.
"""
