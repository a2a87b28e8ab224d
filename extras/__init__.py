"""Optional mechanisms beside the core (see docs/extras.md); each imports only the core and other extras."""
