"""Demo models trained here, offline, on synthetic shapes: they draw what the prompt asks."""
