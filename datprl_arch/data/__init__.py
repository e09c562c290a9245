"""data of datprl, registered into BasicSR on import."""
