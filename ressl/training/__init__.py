"""Training: the loop, one step, its compiled form, stopping, step logs, and whether a
run fits in memory."""
