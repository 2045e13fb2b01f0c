"""Plain training loops, optimizer rebuilding after growth, and checkpoints."""
