"""Training with Lightning: the module, optimizer, sharding, precision, checkpoints, loggers and
callbacks. Sits on the model, analysis and data layers; the command lines sit on it."""
