"""Feature extraction and linear probes (see the probes issue)."""
