"""absl-flag launchers: thin `main`s that wire configs to objects."""
