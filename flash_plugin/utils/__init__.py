"""Small shared helpers (checkpoints, seeding, progress)."""
