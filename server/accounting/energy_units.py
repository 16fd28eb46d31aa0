"""Energy units: joules are what is measured and stored; kilowatt-hours are what a bill charges."""

JOULES_PER_KWH = 3_600_000.0


def kwh(energy_j: float) -> float:
    """`energy_j` joules in kilowatt-hours."""
    return energy_j / JOULES_PER_KWH
