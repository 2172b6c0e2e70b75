"""Radiology reporting and dictation on the archive's durable core."""
