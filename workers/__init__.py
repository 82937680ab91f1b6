"""The GPU worker process: boot, jobs, runtime, the resident (L1) pipeline, batching, model families, output stores."""
