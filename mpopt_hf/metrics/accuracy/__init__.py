"""Package marker so the metric script ships with mpopt_hf (find_packages)."""
