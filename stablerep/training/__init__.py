"""Training: optimizer and schedule, checkpoints and resume, the trainer loop."""
