"""CheckFree: rebuilding a stage whose every replica died, from its neighbours."""
