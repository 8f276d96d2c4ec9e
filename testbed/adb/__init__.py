"""The ADB wire protocol (shared by the virtual adbd and the host backends)."""
