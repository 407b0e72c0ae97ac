"""Evaluation only reads models: accuracy, forgetting over a run, KL, weight drift."""
