"""Training entry point and its pieces: the byte-level stdlib corpus (``data``), the GPT (``model``)."""
