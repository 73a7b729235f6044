"""Code generation: lowering a Program to something that runs (CPU path; Triton to come)."""
