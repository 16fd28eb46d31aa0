"""`student eval`: is the student good enough, and at what price? (see `models.evaluation.command`)."""
