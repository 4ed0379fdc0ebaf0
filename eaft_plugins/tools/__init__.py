"""Command-line tools built on the library: analysis, reproduction, evaluation, the demo, the
synthetic math data and the offline SmolLM2 copy. The library never imports them."""
