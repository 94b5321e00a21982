"""SynthFAR on Ray."""
