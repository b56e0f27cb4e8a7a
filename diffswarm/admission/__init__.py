"""Admission: an expert earns its place by a score anyone holding the dataset can recompute (``score``), and a
swarm's owner decides by a rule over validators' signed scores which checkpoints clients use (``rule``)."""
