"""Consumers of the stage engine inside the trainers people already use: one module per framework, each an optional extra."""
