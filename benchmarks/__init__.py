"""Speed and memory benchmarks of clip_glofnd (`python -m benchmarks.<name>`); results in benchmarks/results/."""
