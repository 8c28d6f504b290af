"""Operations checks against a running server: ``make soak`` (mixed-transport clients, every
result checked against its image) and ``make overload`` (bursts against unloaded latency)."""
