"""The results table against the published one, its writer and figures, and captured-input comparison."""
