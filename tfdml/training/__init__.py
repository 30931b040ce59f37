"""Training internals (the run folder; more to come)."""
