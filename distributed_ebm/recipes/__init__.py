"""The jobs' outlines, written once for every executor: preflight, pending work, progress, results, tracking."""
