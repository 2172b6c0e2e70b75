"""DICOMweb (PS3.18): a thin ASGI adapter over the archive's ingest, find and retrieve services.

Modules: :mod:`~bastion.dicomweb.negotiation` (media types, Accept), :mod:`~bastion.dicomweb.multipart`,
:mod:`~bastion.dicomweb.qido` (QIDO-RS), :mod:`~bastion.dicomweb.wado` (WADO-RS),
:mod:`~bastion.dicomweb.metadata` (cached instance metadata), :mod:`~bastion.dicomweb.pixels` (frames,
bulk data), :mod:`~bastion.dicomweb.rendered`, :mod:`~bastion.dicomweb.stow` (STOW-RS),
:mod:`~bastion.dicomweb.wado_uri` and :mod:`~bastion.dicomweb.routes` (the route table).
"""
