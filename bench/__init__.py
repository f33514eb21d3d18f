"""meshlet's benchmark harness (`make bench`): figures are measured here, never asserted
in tests. Each suite returns a list of result rows; __main__ writes them to
bench/results/<timestamp>.json with the machine's facts.
"""
