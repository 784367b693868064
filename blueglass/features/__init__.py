"""Reaching inside models: the Feature Recorder, per-token metadata, and Lens datasets on disk."""
