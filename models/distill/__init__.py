"""`student distill`: training data from an OpenAI-compatible teacher (plan, prompts, teacher client, output)."""
