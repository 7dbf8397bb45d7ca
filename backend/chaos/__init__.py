"""Chaos soak of the data layer: workers, faults, and a checker of the recorded history."""
