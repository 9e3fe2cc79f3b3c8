"""What contributions are worth: credits and receipts, signed statements, the leaderboard and the run report."""
