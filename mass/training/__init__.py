"""Training: recipes, data preparation, the Ray Train loop and the job that registers the result."""
