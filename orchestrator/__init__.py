"""Session orchestrator for DeepBrain AI Streamer avatar sessions."""
