"""Privacy: accounting (events, epsilon, calibration) and mechanisms (clip and noise)."""
