"""Training: the plain loop, the overfitting monitor, and the trainer that runs a recipe of stages."""
