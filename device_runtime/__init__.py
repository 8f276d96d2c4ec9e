"""fedblocks.device_runtime."""
