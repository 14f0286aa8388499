"""The engine core: requests become sequences, the scheduler plans steps, the runner executes them."""
