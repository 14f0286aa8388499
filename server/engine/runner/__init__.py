"""Executing a StepPlan on the model: the `ModelRunner` interface and its implementations."""
