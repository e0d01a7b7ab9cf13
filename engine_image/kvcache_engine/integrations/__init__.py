"""Integrations of the engine with inference libraries (``transformers``)."""
