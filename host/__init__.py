"""fedblocks.host."""
