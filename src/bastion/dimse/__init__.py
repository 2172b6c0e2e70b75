"""DICOM network services (PS3.7, PS3.8) on asyncio: server, service handlers and SCU.

Bastion speaks the DICOM Upper Layer itself (``pdu``, ``association``) rather than through
pynetdicom's threaded reactor: the storage path streams P-DATA straight into the blob
store, and every socket gets TCP_NODELAY (see BENCHMARKS.md, "DICOM networking").
"""
