"""Job entry points: `python -m jobs.<name> SPEC.yaml`, specs in pipelines.specs."""
