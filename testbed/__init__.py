"""fedblocks.testbed."""
