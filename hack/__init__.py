"""Development scripts (make images). Standard library only."""
