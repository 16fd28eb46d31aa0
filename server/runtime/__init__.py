"""Running the stack: settings, `student serve`, the vLLM supervisor, stop signals, the `student` program."""
