"""xmc-pipeline: scale-out training for extreme classification."""
