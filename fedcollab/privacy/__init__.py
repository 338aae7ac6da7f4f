"""Privacy: accounting (events, epsilon, calibration), mechanisms (clip and noise), empirical (audit statistics)."""
