"""What a federated run gives away, measured: attacks and defences (nothing heavy is imported here)."""
