"""What to run: one YAML per paper setting, and the step loop."""
