"""Measurement, independent of how the model is trained: probes return small immutable readings,
a sink writes them to the database without ever making a training step wait."""
