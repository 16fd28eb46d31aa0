"""`student gpu-check`: the energy meter and the model commands checked on a real NVIDIA GPU (see `runner`)."""
