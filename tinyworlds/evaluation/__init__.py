"""Stage evaluate (scores on the moving objects), the goals table, and video / gif writers."""
