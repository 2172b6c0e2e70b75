"""Bastion: an open-source PACS that never loses an acknowledged image."""

__version__ = "0.1.0"

#: Bastion's DICOM Implementation Class UID (PS3.7 D.3.3.2) and version name.
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1372.1.1"
IMPLEMENTATION_VERSION_NAME = "BASTION_010"
