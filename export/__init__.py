"""fedblocks.export."""
