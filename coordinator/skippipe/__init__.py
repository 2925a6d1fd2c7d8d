"""SkipPipe: path types, the planners, the makespan model, per-node schedules."""
