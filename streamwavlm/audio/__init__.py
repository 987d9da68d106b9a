"""Audio input: checks, file reading, and (later) live sources."""
