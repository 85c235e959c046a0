"""Models written in-repo (see tierplan.zoo for the catalogue)."""
