"""One thin module per framework; each exposes activate()."""
