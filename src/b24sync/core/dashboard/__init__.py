"""The operator's dashboard at `/ui`: users and their sync state, the pipeline at a glance, and
the emulator's leads by stage. Plain HTML, CSS and JS shipped with the package: no build step,
nothing fetched from elsewhere."""
