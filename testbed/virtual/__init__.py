"""Virtual phones: an adbd written in Python that speaks the real ADB protocol.

See docs/virtual_phones.md. Public API::

    from fedblocks.testbed.virtual import VirtualPhone, VirtualTestbed, PhoneProfile, load_profile
"""

from .phone import VirtualPhone, VirtualTestbed, default_authorized_key_files, read_authorized_keys
from .profiles import BUILTIN_PROFILES, PhoneProfile, load_profile

__all__ = ["BUILTIN_PROFILES", "PhoneProfile", "VirtualPhone", "VirtualTestbed",
           "default_authorized_key_files", "load_profile", "read_authorized_keys"]
