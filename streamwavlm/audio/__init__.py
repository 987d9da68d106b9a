"""Audio input: validation, files, the microphone, network streams, and resampling to 16 kHz mono."""
