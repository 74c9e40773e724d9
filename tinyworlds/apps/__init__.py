"""What people run: the `tinyworlds` command, dream and play."""
