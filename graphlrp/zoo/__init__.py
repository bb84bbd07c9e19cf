"""Model definitions graphlrp ships for its own evaluations (weights are not bundled)."""
