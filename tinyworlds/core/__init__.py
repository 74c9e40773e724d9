"""The bottom layer: errors, atomic writes, params and the data layout, typed configs, device choice."""
