"""The HTTP side: health, JSON API, admin page, the bundled OHIF viewer, and DICOMweb mounted in."""
