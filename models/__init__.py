"""Building, merging and verifying the student model that `server/` serves."""
